"""vLLM 0.32 / 0.33: the plugin's Hugging Face config classes (``model_type`` rwkv6 and rwkv7) stay the ones
vLLM loads, whatever else registers those model types later.

transformers' AutoConfig keeps the last class registered for a model type. flash-linear-attention registers
its own RWKV6Config and RWKV7Config for the same two names when it is imported (the CUDA kernels import it, and
so may a user's script): from then on vLLM would load fla's classes, whose RWKV7Config brings
``max_position_embeddings`` 2048 (vLLM caps ``max_model_len`` at it) and whose RWKV6Config does not read a
Finch checkpoint's fields. vLLM re-registers the classes of its own table, ``_CONFIG_REGISTRY``, with AutoConfig
at every config load; this adds ours to that table.
"""

from __future__ import annotations

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")


def apply(config_classes: list[type]) -> None:
    check_target(
        "hf_configs", TARGET_VLLM,
        "check that vllm/transformers_utils/config.py still registers _CONFIG_REGISTRY's class with AutoConfig "
        "before it calls AutoConfig.from_pretrained",
    )
    from transformers import AutoConfig
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    for config_class in config_classes:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        _CONFIG_REGISTRY[config_class.model_type] = config_class
