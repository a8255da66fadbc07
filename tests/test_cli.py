"""The `vllm-oprm serve` launcher's argument handling (the server itself is in test_vllm_server.py)."""

import pytest

pytest.importorskip("vllm")

from vllm_oprm.entrypoints.cli import server_argv  # noqa: E402


def test_serve_adds_oprm_to_vllms_arguments_and_environment():
    env = {}
    argv = server_argv(["serve", "/m", "--port", "8001", "--oprm-chunk-size", "500", "--oprm-idk", "Error"], env)
    assert argv == ["--model", "/m", "--port", "8001"]  # the allow-listed plugin adds its engine pieces
    assert env["OPRM_CHUNK_SIZE"] == "500" and env["OPRM_IDK"] == "Error"
    assert "oprm" in env["VLLM_PLUGINS"].split(",")


def test_serve_keeps_the_users_arguments_and_plugin_allow_list():
    env = {"VLLM_PLUGINS": "other"}
    argv = server_argv(["serve", "/m", "--logits-processors=my.mod:Proc", "--worker-extension-cls", "my.Ext"], env)
    assert argv == ["--model", "/m", "--logits-processors=my.mod:Proc", "--worker-extension-cls", "my.Ext"]
    assert env["VLLM_PLUGINS"] == "other,oprm"


def test_serve_prefix_cache_turns_on_vllms_prefix_caching():
    env = {}
    assert "--enable-prefix-caching" in server_argv(["serve", "/m", "--oprm-prefix-cache", "true"], env)
    assert env["OPRM_PREFIX_CACHE"] == "true"
    kept = server_argv(["serve", "/m", "--oprm-prefix-cache", "1", "--no-enable-prefix-caching"], {})
    assert "--enable-prefix-caching" not in kept  # the user's choice stands; the server then refuses to start
    assert "--enable-prefix-caching" not in server_argv(["serve", "/m", "--oprm-prefix-cache", "false"], {})


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: vllm-oprm serve"),
        (["run", "/m"], "usage: vllm-oprm serve"),
        (["serve", "/m", "--oprm-chunk-size", "big"], "OPRM_CHUNK_SIZE must be an integer"),
        (["serve", "/m", "--oprm-prefix-cache", "sometimes"], "OPRM_PREFIX_CACHE must be true or false"),
    ],
)
def test_serve_rejects_what_cannot_work(argv, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        server_argv(argv, {})
