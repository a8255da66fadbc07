"""vLLM general plugin: runs in every vLLM process, so it stays cheap and idempotent.

Installing the package is enough: vLLM calls ``register()`` through the
``vllm.general_plugins`` entry point. Requests without OPRM options are
untouched; OPRM's entropy processor and worker extension are added only by
``OPRMLLM``. On the CPU platform of vLLM 0.32.0 it applies the Mamba1 fix in
``patches/`` so Mamba / FalconMamba run there.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        import vllm

        from vllm_oprm.patches import vllm_0_32_cpu_mamba1

        if vllm.__version__ == vllm_0_32_cpu_mamba1.TARGET_VLLM:
            vllm_0_32_cpu_mamba1.apply()
        else:
            logger.warning("vllm-oprm: no Mamba1 CPU patch for vLLM %s; Mamba1 may fail on CPU", vllm.__version__)
