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

    def row_groups(self, metadata: dict, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This step's work, as ``(tokens, slots, fresh)`` groups to run from cached states: every decode
        together (tokens [n, 1]: one per row), then each prompt part alone (tokens [1, T]). ``tokens``
        picks the group's tokens out of the flat batch, ``slots`` its rows' state slots; ``fresh`` marks
        rows starting from a zero state (nothing of the request computed before). Padding rows
        (slot < 0) are left out."""
        meta = metadata[self.prefix]
        starts, lengths, slots = meta.query_start_loc.tolist(), meta.seq_lens.tolist(), meta.state_indices_tensor.tolist()
        groups = []

        def add(tokens: list[list[int]], rows: list[int], fresh: list[bool]) -> None:
            groups.append(tuple(torch.tensor(t, device=device) for t in (tokens, [slots[i] for i in rows], fresh)))

        decodes = [i for i in range(meta.num_decodes) if slots[i] >= 0]
        if decodes:
            add([[starts[i]] for i in decodes], decodes, [lengths[i] == 1 for i in decodes])
        for i in range(meta.num_decodes, meta.num_decodes + meta.num_prefills):
            start, end = starts[i], starts[i + 1]
            if slots[i] >= 0:
                add([list(range(start, end))], [i], [lengths[i] == end - start])
        return groups

    def read(self, slots: torch.Tensor, fresh: torch.Tensor) -> list[torch.Tensor]:
        """Every state of the rows in ``slots`` ([rows, ...] each), zeros for ``fresh`` rows: chosen with
        ``where``, not multiplied away, since a reused slot may hold non-finite leftovers."""
        return [torch.where(fresh.view(-1, *[1] * (state.dim() - 1)), 0.0, state[slots]) for state in self.kv_cache]

    def write(self, slots: torch.Tensor, states) -> None:
        """Store the rows' states after a step, in ``get_state_shape``'s order."""
        for cache, new in zip(self.kv_cache, states):
            cache[slots] = new.to(cache.dtype)
