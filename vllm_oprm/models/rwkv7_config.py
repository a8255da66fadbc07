"""The Hugging Face config class for ``model_type: rwkv7`` (flash-linear-attention's checkpoints), and the sizes
it implies.

Kept apart from the model so the plugin can register it in every vLLM process without importing torch
layers or fla. Fields are whatever fla's config.json holds, except ``max_position_embeddings``: fla writes
2048 there, but RWKV7 has no positions, and vLLM would cap ``max_model_len`` at it.
``rwkv7_sizes`` fills what fla derives when a field is null and refuses what the vLLM class does not
implement.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import PretrainedConfig


class Rwkv7HFConfig(PretrainedConfig):
    model_type = "rwkv7"

    def __init__(self, max_position_embeddings: int | None = None, **kwargs):
        super().__init__(**kwargs)  # max_position_embeddings dropped: RWKV7 has no positions to run out of


class Rwkv7Sizes(NamedTuple):
    heads: int
    head_dim: int
    intermediate: int
    decay_rank: int  # LoRA ranks: w_lora, a_lora, v_lora, g_lora
    a_rank: int
    v_rank: int
    gate_rank: int


def _lora_rank(scale: float, hidden: int, factor: float) -> int:
    """fla 0.6's default LoRA rank for a null field: ``scale * sqrt(hidden)``, grown with the head size,
    rounded to a multiple of 32, at least 32."""
    return max(32, int(round(scale * hidden**0.5 * factor / 32) * 32))


def rwkv7_sizes(config) -> Rwkv7Sizes:
    """The sizes fla's RWKV7 builds from ``config`` (fla's ``RWKV7Config`` or ``Rwkv7HFConfig``); ValueError,
    naming the field, for a checkpoint this class cannot run: hybrid softmax-attention layers (``attn``), a
    channel-mix activation other than fla's ``sqrelu`` (``hidden_act``), or a ``value_dim`` other than the
    hidden size."""
    hidden = config.hidden_size
    if getattr(config, "attn", None):
        raise ValueError("RWKV7 with softmax-attention layers (config field attn) is not supported")
    act = getattr(config, "hidden_act", "sqrelu")
    if act != "sqrelu":
        raise ValueError(f"RWKV7 hidden_act {act!r} is not supported (only fla's 'sqrelu')")
    value_dim = getattr(config, "value_dim", None)
    widths = set(value_dim) if isinstance(value_dim, list) else {value_dim or hidden}
    if widths != {hidden}:
        raise ValueError(f"RWKV7 value_dim {value_dim} is not supported (only the hidden size, {hidden})")
    head_dim, heads = getattr(config, "head_dim", None), getattr(config, "num_heads", None)
    if head_dim is None and heads is None:
        raise ValueError("RWKV7 config sets neither head_dim nor num_heads")
    head_dim = head_dim or hidden // heads
    if hidden % head_dim:
        raise ValueError(f"RWKV7 hidden_size {hidden} is not a multiple of head_dim {head_dim}")
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is None:  # fla: hidden * hidden_ratio (default 4), rounded up to a multiple of 32
        intermediate = 32 * -(-int(hidden * (getattr(config, "hidden_ratio", None) or 4)) // 32)
    factor = head_dim / 64

    def rank(field: str, default: int) -> int:
        value = getattr(config, field, None)
        return default if value is None else value

    return Rwkv7Sizes(
        heads=hidden // head_dim,
        head_dim=head_dim,
        intermediate=intermediate,
        decay_rank=rank("decay_low_rank_dim", _lora_rank(2.5, hidden, factor)),
        a_rank=rank("a_low_rank_dim", _lora_rank(2.5, hidden, factor)),
        v_rank=rank("v_low_rank_dim", _lora_rank(1.7, hidden, factor)),
        gate_rank=rank("gate_low_rank_dim", _lora_rank(5.0, hidden, 1.0)),
    )
