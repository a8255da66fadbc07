"""vLLM general plugin: runs in every vLLM process, so it stays cheap and idempotent.

Installing the package is enough: vLLM calls ``register()`` through the
``vllm.general_plugins`` entry point. It registers the model classes vLLM lacks
(lazily, as ``"module:Class"`` strings) with their Hugging Face config classes
and has chunk requests' detokenizers primed with their prompt's tail; on the CPU
platform it also applies the Mamba1, Mamba2 prefix-caching and Ray-executor
fixes. All of these are version-gated fixes in ``patches/``.
Requests without OPRM options are untouched; OPRM's entropy processor and
worker extension are added only by ``OPRMLLM`` and ``vllm-oprm serve``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False

MODELS = {
    "Rwkv6ForCausalLM": "vllm_oprm.models.rwkv6:Rwkv6ForCausalLM",
    "RecurrentGemmaForCausalLM": "vllm_oprm.models.recurrent_gemma:RecurrentGemmaForCausalLM",
}


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from vllm_oprm.engine.capture import CAPTURE_KEY
    from vllm_oprm.models.rwkv6_config import Rwkv6HFConfig
    from vllm_oprm.patches import (
        vllm_0_32_cpu_mamba1,
        vllm_0_32_cpu_mamba2_checkpoints,
        vllm_0_32_cpu_ray,
        vllm_0_32_detokenizer_prompt_tail,
        vllm_0_32_model_configs,
    )

    if vllm.__version__ == vllm_0_32_model_configs.TARGET_VLLM:
        AutoConfig.register(Rwkv6HFConfig.model_type, Rwkv6HFConfig, exist_ok=True)
        vllm_0_32_model_configs.apply(list(MODELS), without_prefix_caching=("RecurrentGemmaForCausalLM",))
        for architecture, path in MODELS.items():
            ModelRegistry.register_model(architecture, path)
        vllm_0_32_detokenizer_prompt_tail.apply(CAPTURE_KEY)
    else:
        logger.warning(
            "vllm-oprm: model classes %s not registered, chunk detokenizers not trimmed on vLLM %s",
            list(MODELS),
            vllm.__version__,
        )

    if current_platform.is_cpu():
        if vllm.__version__ == vllm_0_32_cpu_mamba1.TARGET_VLLM:
            vllm_0_32_cpu_mamba1.apply()
            vllm_0_32_cpu_mamba2_checkpoints.apply()
            vllm_0_32_cpu_ray.apply()
        else:
            logger.warning("vllm-oprm: no CPU patches (Mamba1, Mamba2 prefix caching, Ray executor) for vLLM %s", vllm.__version__)
