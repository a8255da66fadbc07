"""The Hugging Face config class for ``model_type: rwkv6`` (transformers has none), and the sizes it implies.

Kept apart from the model so the plugin can register it in every vLLM process
without importing torch layers. Fields are whatever the checkpoint's
config.json holds; ``rwkv6_sizes`` fills the ones Finch configs may leave null.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import PretrainedConfig


class Rwkv6HFConfig(PretrainedConfig):
    model_type = "rwkv6"


class Rwkv6Sizes(NamedTuple):
    attention: int
    heads: int
    intermediate: int


def rwkv6_sizes(config) -> Rwkv6Sizes:
    """Time-mix width (default: hidden size), its heads, and the channel-mix width (Finch's default
    of 3.5x hidden, rounded down to a multiple of 32)."""
    attention = getattr(config, "attention_hidden_size", None) or config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or int((config.hidden_size * 3.5) // 32 * 32)
    return Rwkv6Sizes(attention, attention // config.head_size, intermediate)
