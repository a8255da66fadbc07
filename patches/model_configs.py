"""vLLM 0.32: give out-of-tree recurrent architectures Mamba's model-config fix-ups.

vLLM sets ``cache_config.mamba_block_size`` (needed by every ``MambaBase``
layer) only for architectures listed in its internal ``MODELS_CONFIG_MAP``;
there is no public hook. This adds ours, and only on the version it was read
against. Our classes loop over a batch's requests in Python (reading the
metadata on the host), which neither CUDA graphs nor torch.compile can
capture, so they always run eager, as ``enforce_eager`` does. Hybrid
(attention + recurrent) models get prefix caching on by default in vLLM;
architectures in ``without_prefix_caching`` keep one state per request, so for
them it is turned off, with a warning.
"""

from __future__ import annotations

import logging

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
logger = logging.getLogger(__name__)


def apply(architectures: list[str], without_prefix_caching: tuple[str, ...] = ()) -> None:
    check_target(
        "model_configs", TARGET_VLLM, "check that vllm/model_executor/models/config.py still keys MODELS_CONFIG_MAP by architecture"
    )
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    class Eager(MambaModelConfig):
        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            if not vllm_config.model_config.enforce_eager:
                logger.info("vllm-oprm: %s runs eager (no CUDA graphs or torch.compile)", vllm_config.model_config.architecture)
                vllm_config.model_config.enforce_eager = True
            super().verify_and_update_config(vllm_config)

    class EagerWithoutPrefixCaching(Eager):
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
        hook = EagerWithoutPrefixCaching if architecture in without_prefix_caching else Eager
        MODELS_CONFIG_MAP.setdefault(architecture, hook)
