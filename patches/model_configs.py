"""vLLM 0.32 / 0.33: give out-of-tree recurrent architectures Mamba's model-config fix-ups, and their
state ops the place vLLM gives its own in piecewise compilation.

vLLM sets ``cache_config.mamba_block_size`` (needed by every ``MambaBase``
layer) only for architectures listed in its internal ``MODELS_CONFIG_MAP``;
there is no public hook. This adds ours. Hybrid (attention + recurrent) models
get prefix caching on by default in vLLM; architectures in
``without_prefix_caching`` keep one state per request, so for them it is turned
off, with a warning. Our layers' state ops (``torch.ops.vllm.oprm_*``) join
``CompilationConfig._attention_ops``, the ops vLLM splits its compiled graph at
(so piecewise CUDA graphs leave them out, as they leave out ``mamba_mixer2``).
"""

from __future__ import annotations

import logging

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
STATE_OPS = ("vllm::oprm_token_shift", "vllm::oprm_rwkv6_wkv", "vllm::oprm_recurrent_gemma_rglru")
logger = logging.getLogger(__name__)


def apply(architectures: list[str], without_prefix_caching: tuple[str, ...] = ()) -> None:
    check_target(
        "model_configs", TARGET_VLLM,
        "check that vllm/model_executor/models/config.py still keys MODELS_CONFIG_MAP by architecture and "
        "that vllm/config/compilation.py still splits at CompilationConfig._attention_ops",
    )
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    class WithoutPrefixCaching(MambaModelConfig):
        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            if vllm_config.cache_config.enable_prefix_caching:
                logger.warning(
                    "vllm-oprm: %s keeps one recurrent state per request (no per-block checkpoints): "
                    "prefix caching is turned off",
                    vllm_config.model_config.architecture,
                )
                vllm_config.cache_config.enable_prefix_caching = False
            super().verify_and_update_config(vllm_config)

    for architecture in architectures:
        MODELS_CONFIG_MAP.setdefault(architecture, WithoutPrefixCaching if architecture in without_prefix_caching else MambaModelConfig)
    CompilationConfig._attention_ops.extend(op for op in STATE_OPS if op not in CompilationConfig._attention_ops)
