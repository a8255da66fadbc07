"""Isolated, version-gated fixes to vLLM, applied by vllm_oprm.plugin (installed as vllm_oprm.patches).

Each module names the vLLM releases it was read against in ``TARGET_VLLM``; its
``apply()`` raises on any other release, so a vLLM upgrade fails loudly instead
of running a fix against code it was not written for.
"""

from __future__ import annotations


def vllm_release() -> str:
    """The installed vLLM's release, without a local build tag ("0.33.0+cpu" -> "0.33.0")."""
    import vllm

    return vllm.__version__.split("+", 1)[0]


def check_target(patch: str, targets: tuple[str, ...], before_retargeting: str) -> None:
    """Raise unless the installed vLLM is one of ``targets``; ``before_retargeting`` says what to re-read."""
    found = vllm_release()
    if found not in targets:
        raise RuntimeError(
            f"patches/{patch}.py targets vLLM {' and '.join(targets)}, found {found}: {before_retargeting}"
        )
