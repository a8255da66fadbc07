"""vLLM 0.32: give out-of-tree recurrent architectures Mamba's model-config fix-ups.

vLLM sets ``cache_config.mamba_block_size`` (needed by every ``MambaBase``
layer) only for architectures listed in its internal ``MODELS_CONFIG_MAP``;
there is no public hook. This adds ours, and only on the version it was read
against.
"""

from __future__ import annotations

TARGET_VLLM = "0.32.0"


def apply(architectures: list[str]) -> None:
    import vllm

    if vllm.__version__ != TARGET_VLLM:
        raise RuntimeError(
            f"patches/vllm_0_32_model_configs.py targets vLLM {TARGET_VLLM}, found {vllm.__version__}: "
            "check that vllm/model_executor/models/config.py still keys MODELS_CONFIG_MAP by architecture"
        )
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    for architecture in architectures:
        MODELS_CONFIG_MAP.setdefault(architecture, MambaModelConfig)
