"""vLLM 0.32 and 0.33 on CPU: rotary embedding of per-head query and key tensors.

``RotaryEmbedding.forward_cpu`` hands query and key to the C++ kernel
(``torch.ops._C.rotary_embedding``, in place) in the shape the model gives them.
For 3-D per-head tensors, [tokens, heads, head_size] with more than one head,
that kernel rotates by the wrong positions; 2-D [tokens, heads * head_size]
tensors, or one head, come out exact. vLLM's LFM2 attention passes per-head
tensors (it normalises q and k per head first), so its logits on CPU differed
from transformers' by up to 0.17 nats. This patch hands the kernel 2-D views of
the same memory, so the rotation is still in place and the 3-D tensors the
model passed are the ones rotated.
"""

from __future__ import annotations

import torch

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
_applied = False


def _token_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """[tokens, heads, head_size] as a [tokens, heads * head_size] view (the same memory)."""
    return tensor.view(tensor.shape[0], -1) if tensor is not None and tensor.dim() == 3 else tensor


def apply() -> None:
    """Patch ``RotaryEmbedding.forward_cpu`` in this process (idempotent)."""
    global _applied
    check_target("cpu_rotary_heads", TARGET_VLLM, "check whether the CPU rotary kernel still mis-rotates 3-D input")
    if _applied:
        return
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    forward_cpu = RotaryEmbedding.forward_cpu

    def forward_cpu_on_token_rows(self, positions, query, key=None):
        forward_cpu(self, positions, _token_rows(query), _token_rows(key))
        return query, key

    RotaryEmbedding.forward_cpu = forward_cpu_on_token_rows
    _applied = True
