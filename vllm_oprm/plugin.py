"""vLLM general plugin: runs in every vLLM process, so it stays cheap and idempotent.

Installing the package is enough: vLLM calls ``register()`` through the
``vllm.general_plugins`` entry point. Nothing here touches requests without
OPRM options; OPRM's entropy processor and worker extension are added only by
``OPRMLLM`` and ``vllm-oprm serve``.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
