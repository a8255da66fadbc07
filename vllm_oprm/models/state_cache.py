"""The one vLLM-facing piece both model classes share: a layer that only owns recurrent state."""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum


class StateCache(nn.Module, MambaBase):
    """Per-request state tensors that vLLM's recurrent-state manager allocates, as for Mamba;
    it computes nothing itself. Its metadata comes from vLLM's linear-attention backend
    (plain torch, so it runs on CPU). After binding, ``kv_cache[i][slot]`` is state ``i``
    of the request in ``slot``. Put fp32 states first so every view stays aligned."""

    def __init__(self, shapes, dtypes, vllm_config: VllmConfig, prefix: str):
        if vllm_config.cache_config.mamba_cache_mode != "none":
            raise ValueError(
                f"{vllm_config.model_config.architecture} does not support prefix caching in vllm-oprm "
                "(its state layer keeps one state per request): start the engine without enable_prefix_caching"
            )
        nn.Module.__init__(self)
        self.prefix = prefix
        self._shapes, self._dtypes = tuple(shapes), tuple(dtypes)
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

    def row_groups(self, metadata: dict, device) -> list[tuple[torch.Tensor, list[int], list[bool]]]:
        """This step's work, as ``(index, slots, fresh)`` groups to run from cached states: every decode
        together (index [n, 1]: one token per row), then each prompt part alone (index [1, T]). ``index``
        picks the group's tokens out of the flat batch; ``fresh`` marks rows starting from a zero state
        (nothing of the request computed before). Padding rows (slot < 0) are left out."""
        meta = metadata[self.prefix]
        starts, lengths, slots = meta.query_start_loc.tolist(), meta.seq_lens.tolist(), meta.state_indices_tensor.tolist()
        groups = []
        decodes = [i for i in range(meta.num_decodes) if slots[i] >= 0]
        if decodes:
            index = torch.tensor([[starts[i]] for i in decodes], device=device)
            groups.append((index, [slots[i] for i in decodes], [lengths[i] == 1 for i in decodes]))
        for i in range(meta.num_decodes, meta.num_decodes + meta.num_prefills):
            start, end = starts[i], starts[i + 1]
            if slots[i] >= 0:
                groups.append((torch.arange(start, end, device=device)[None], [slots[i]], [lengths[i] == end - start]))
        return groups
