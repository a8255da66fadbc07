"""vLLM 0.32 / 0.33: give out-of-tree recurrent architectures Mamba's model-config fix-ups, and their
state ops the place vLLM gives its own in piecewise compilation.

vLLM sets ``cache_config.mamba_block_size`` (needed by every ``MambaBase``
layer) only for architectures listed in its internal ``MODELS_CONFIG_MAP``;
there is no public hook. This adds ours (so hybrids get vLLM's default: prefix
caching on, in align mode). Our layers' state ops (``torch.ops.vllm.oprm_*``) join
``CompilationConfig._attention_ops``, the ops vLLM splits its compiled graph at
(so piecewise CUDA graphs leave them out, as they leave out ``mamba_mixer2``).
"""

from __future__ import annotations

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
STATE_OPS = (
    "vllm::oprm_token_shift", "vllm::oprm_rwkv6_wkv", "vllm::oprm_rwkv7_wkv", "vllm::oprm_recurrent_gemma_rglru",
)


def apply(architectures: list[str]) -> None:
    check_target(
        "model_configs", TARGET_VLLM,
        "check that vllm/model_executor/models/config.py still keys MODELS_CONFIG_MAP by architecture and "
        "that vllm/config/compilation.py still splits at CompilationConfig._attention_ops",
    )
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    for architecture in architectures:
        MODELS_CONFIG_MAP.setdefault(architecture, MambaModelConfig)
    CompilationConfig._attention_ops.extend(op for op in STATE_OPS if op not in CompilationConfig._attention_ops)
