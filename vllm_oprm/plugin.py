"""vLLM general plugin: runs in every vLLM process, so it stays cheap and idempotent.

Installing the package is enough: vLLM calls ``register()`` through the
``vllm.general_plugins`` entry point. On a supported vLLM it registers the model
classes vLLM lacks (lazily, as ``"module:Class"`` strings) with their Hugging
Face config classes, has chunk requests' detokenizers primed with their
prompt's tail, gives OPRM's entropy processor to the model runner vLLM picks
(V1 or Model Runner V2) and, on the CPU platform, applies the Mamba1, Mamba2
prefix-caching, Ray-executor and per-head rotary fixes: each a fix in ``patches/`` that names
the vLLM releases it targets and is applied on those only. On any other vLLM
nothing is registered (a warning says so) and the first use of an OPRM feature
raises ``require_supported_vllm``'s error. Requests without OPRM options are
untouched; OPRM's entropy processor and worker extension are added only by
``OPRMLLM`` and by a server that allow-lists the ``oprm`` endpoint plugin
(``VLLM_PLUGINS=oprm vllm serve``, or ``vllm-oprm serve``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False

SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # releases the plugin and its patches were read against and tested on
MODELS = {
    "Rwkv6ForCausalLM": "vllm_oprm.models.rwkv6:Rwkv6ForCausalLM",
    "RWKV7ForCausalLM": "vllm_oprm.models.rwkv7:RWKV7ForCausalLM",
    "RecurrentGemmaForCausalLM": "vllm_oprm.models.recurrent_gemma:RecurrentGemmaForCausalLM",
}


def unsupported_vllm() -> str | None:
    """Why the installed vLLM cannot run OPRM, or None when it is a supported release."""
    from vllm_oprm.patches import vllm_release

    found = vllm_release()
    if found in SUPPORTED_VLLM:
        return None
    return f"vllm-oprm supports vLLM {' and '.join(SUPPORTED_VLLM)}; found vLLM {found}"


def require_supported_vllm() -> None:
    """Raise the one clear error every OPRM entry point gives on an unsupported vLLM."""
    reason = unsupported_vllm()
    if reason is not None:
        raise RuntimeError(reason + ": install a supported release (pip install 'vllm-oprm[gpu]' or '[cpu]')")


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    reason = unsupported_vllm()
    if reason is not None:
        logger.warning("%s: nothing registered, OPRM features will refuse to start", reason)
        return
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from vllm_oprm.engine.capture import CAPTURE_KEY, PROCESSOR, oprm_worker_extension
    from vllm_oprm.engine.capture_v2 import PROCESSOR_V2
    from vllm_oprm.models.rwkv6_config import Rwkv6HFConfig
    from vllm_oprm.models.rwkv7_config import Rwkv7HFConfig
    from vllm_oprm.patches import (
        cpu_mamba1,
        cpu_mamba2_checkpoints,
        cpu_ray,
        cpu_rotary_heads,
        detokenizer_prompt_tail,
        hf_configs,
        model_configs,
        runner_logits_processor,
        serve_engine_args,
        vllm_release,
    )

    release = vllm_release()
    hf_configs.apply([Rwkv6HFConfig, Rwkv7HFConfig])
    model_configs.apply(list(MODELS))
    for architecture, path in MODELS.items():
        ModelRegistry.register_model(architecture, path)
    detokenizer_prompt_tail.apply(CAPTURE_KEY)
    runner_logits_processor.apply(PROCESSOR, PROCESSOR_V2)
    serve_engine_args.apply(PROCESSOR, oprm_worker_extension)
    if current_platform.is_cpu():
        for patch in (cpu_mamba1, cpu_mamba2_checkpoints, cpu_ray, cpu_rotary_heads):
            if release in patch.TARGET_VLLM:
                patch.apply()
