"""RWKV6 (Finch) for vLLM: the torch reference's layers, each request's state in vLLM's state cache.

Every block's state (the fp32 WKV matrix per head, the time-mix and the
channel-mix token-shift vectors) lives in one ``Rwkv6StateCache`` layer that
vLLM's recurrent-state manager allocates per request, exactly as for Mamba;
the metadata comes from vLLM's linear-attention backend (plain torch, so it
runs on CPU). The recurrence itself is ``vllm_oprm.ops.wkv6.wkv6_recurrent_ref``
through the reference model, so this class equals the reference by
construction; decodes run batched, prefills one request at a time.

Not sharded: tensor parallelism is not supported (the head is a plain linear).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..reference.rwkv6 import Rwkv6Config, Rwkv6State
from ..reference.rwkv6 import Rwkv6ForCausalLM as Rwkv6Reference

WKV, ATT_SHIFT, FFN_SHIFT = range(3)  # order of the states in a cache block (fp32 first: aligned views)


class Rwkv6StateCache(nn.Module, MambaBase):
    """vLLM's handle on one block's recurrent state; it computes nothing itself."""

    def __init__(self, config: Rwkv6Config, dtype: torch.dtype, vllm_config: VllmConfig, prefix: str):
        nn.Module.__init__(self)
        self.prefix = prefix
        self._shapes = ((config.num_heads, config.head_size, config.head_size), (config.hidden_size,), (config.hidden_size,))
        self._dtypes = (torch.float32, dtype, dtype)
        self.kv_cache = (torch.tensor([]),)
        layers = vllm_config.compilation_config.static_forward_context
        if prefix in layers:
            raise ValueError(f"duplicate layer name {prefix}")
        layers[prefix] = self

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self._dtypes

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR


class Rwkv6ForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = Rwkv6Config.from_dict(vllm_config.model_config.hf_config.to_dict())
        self.reference = Rwkv6Reference(self.config)
        dtype = vllm_config.model_config.dtype
        self.states = nn.ModuleList(
            Rwkv6StateCache(self.config, dtype, vllm_config, f"{prefix}states.{layer}.cache")
            for layer in range(self.config.num_hidden_layers)
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.reference.rwkv.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # vLLM's profiling and warm-up runs: no requests, no cache
            return self.reference.backbone(input_ids[None])[0][0]
        meta = metadata[self.states[0].prefix]
        hidden = torch.zeros(input_ids.shape[0], self.config.hidden_size, dtype=self.reference.dtype, device=input_ids.device)
        starts = meta.query_start_loc.tolist()
        lengths = meta.seq_lens.tolist()
        slots = meta.state_indices_tensor.tolist()
        decodes = [i for i in range(meta.num_decodes) if slots[i] >= 0]
        if decodes:  # one token each, first in the batch: one batched step
            positions_d = torch.tensor([starts[i] for i in decodes], device=input_ids.device)
            fresh = [lengths[i] == 1 for i in decodes]  # a new one-token prompt starts from zero
            out = self._run(input_ids[positions_d][:, None], [slots[i] for i in decodes], fresh)
            hidden[positions_d] = out[:, 0]
        for i in range(meta.num_decodes, meta.num_decodes + meta.num_prefills):
            if slots[i] < 0:
                continue
            start, end = starts[i], starts[i + 1]
            fresh = lengths[i] == end - start  # nothing computed before this chunk of the prompt
            hidden[start:end] = self._run(input_ids[start:end][None], [slots[i]], [fresh])[0]
        return hidden

    def _run(self, input_ids: torch.Tensor, slots: list[int], fresh: list[bool]) -> torch.Tensor:
        """Run rows from their cached states (zeros where fresh) and store the states after them."""
        index = torch.tensor(slots, device=input_ids.device)
        keep = torch.tensor([not f for f in fresh], device=input_ids.device)
        caches = [layer.kv_cache for layer in self.states]

        def gather(which: int) -> torch.Tensor:
            stacked = torch.stack([cache[which][index] for cache in caches])  # [layers, B, ...]
            return stacked * keep.view(1, -1, *([1] * (stacked.dim() - 2))).to(stacked.dtype)

        state = Rwkv6State(att_shift=gather(ATT_SHIFT), wkv=gather(WKV), ffn_shift=gather(FFN_SHIFT))
        hidden, state = self.reference.backbone(input_ids, state)
        for layer, cache in enumerate(caches):
            cache[WKV][index] = state.wkv[layer]
            cache[ATT_SHIFT][index] = state.att_shift[layer]
            cache[FFN_SHIFT][index] = state.ffn_shift[layer]
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.reference.head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.reference.load_checkpoint_weights(dict(weights))
        self.reference.rescale_for_half_precision()
        return {f"reference.{name}" for name, _ in self.reference.named_parameters()}
