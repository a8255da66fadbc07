"""Batched prefill and single-row decode for each recurrent family, exact under padding.

Every backend takes chunk rows of unequal length, left-pads them into one batch
and returns each row's last-token logits and a batch state from which any one
row can be taken and decoded alone. Padding never changes a row: the pad
positions are masked so that a padded row ends in the very state of that row
run alone (the tests check logits and states against single-row runs).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .rwkv6 import Rwkv6ForCausalLM
from .rwkv7 import Rwkv7ForCausalLM

TokenIds = list[int]


def left_pad(rows: list[TokenIds], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-aligned in one [B, T] tensor, and the mask (1 = token, 0 = pad)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class RowState:
    """One sequence's recurrent state, advanced in place by ``step``."""

    state: Any
    extra: dict = field(default_factory=dict)


class FamilyBackend:
    """Prefill a batch of rows, take one row's state, decode it token by token."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0):
        self.model = model
        self.pad_token_id = pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefill(self, rows: list[TokenIds]) -> tuple[torch.Tensor, Any]:
        """Last-token logits [B, vocab] and the batch state."""
        raise NotImplementedError

    def take(self, batch_state: Any, row: int) -> RowState:
        raise NotImplementedError

    def step(self, row: RowState, token_id: int) -> torch.Tensor:
        """Feed one token; return the next-token logits [vocab]."""
        raise NotImplementedError


class CacheFamilyBackend(FamilyBackend):
    """Mamba, FalconMamba, Mamba2: transformers keeps their state in a DynamicCache
    and zeroes masked positions, so left padding with a mask is exact."""

    @torch.no_grad()
    def prefill(self, rows):
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True)
        return out.logits[:, -1].float(), out.cache_params

    def take(self, batch_state, row):
        cache = copy.deepcopy(batch_state)
        cache.reorder_cache(torch.tensor([row], device=self.device))
        return RowState(cache)

    @torch.no_grad()
    def step(self, row, token_id):
        ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=ids, cache_params=row.state, use_cache=True)
        row.state = out.cache_params
        return out.logits[0, -1].float()


class RecurrentGemmaBackend(FamilyBackend):
    """RecurrentGemma (Griffin): recurrent blocks keep their state on the modules,
    local-attention blocks in a DynamicCache.

    Padding is made exact by giving pads position 0 (the RG-LRU resets there and
    again at the row's first token), zeroing the conv input at pads (the row
    alone sees zero padding there) and masking pads out of attention; a row
    taken out of the batch drops its pads from the attention cache.
    """

    def _recurrent_blocks(self):
        return [
            layer.temporal_block
            for layer in self.model.model.layers
            if hasattr(layer.temporal_block, "rg_lru")
        ]

    @contextmanager
    def _pads_zeroed_before_conv(self, mask: torch.Tensor):
        keep = mask.bool()[..., None]

        def zero_pads(_module, _inputs, output):
            return torch.where(keep, output, torch.zeros_like(output))

        hooks = [block.linear_x.register_forward_hook(zero_pads) for block in self._recurrent_blocks()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _module_states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b.conv1d_state, b.rg_lru.recurrent_states) for b in self._recurrent_blocks()]

    def _install(self, states) -> None:
        for block, (conv, rnn) in zip(self._recurrent_blocks(), states):
            block.conv1d_state, block.rg_lru.recurrent_states = conv, rnn

    @torch.no_grad()
    def prefill(self, rows):
        from transformers import DynamicCache

        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model._setup_cache(self.model.config, ids.shape[0], self.device, self.model.dtype)
        with self._pads_zeroed_before_conv(mask):
            out = self.model(
                input_ids=ids, position_ids=positions, attention_mask=mask,
                past_key_values=cache, use_cache=True,
            )
        return out.logits[:, -1].float(), (self._module_states(), cache, mask)

    def take(self, batch_state, row):
        states, cache, mask = batch_state
        length = int(mask[row].sum())
        cache = copy.deepcopy(cache)
        cache.reorder_cache(torch.tensor([row], device=self.device))
        for layer in cache.layers:  # drop the row's left pads: its cache is then the unpadded one
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                kept = min(length, layer.keys.shape[-2])
                layer.keys, layer.values = layer.keys[..., -kept:, :], layer.values[..., -kept:, :]
                layer.cumulative_length = length
        own = [(conv[row : row + 1].clone(), rnn[row : row + 1].clone()) for conv, rnn in states]
        return RowState((own, cache), {"position": length})

    @torch.no_grad()
    def step(self, row, token_id):
        states, cache = row.state
        self._install(states)
        out = self.model(
            input_ids=torch.tensor([[token_id]], device=self.device),
            position_ids=torch.tensor([[row.extra["position"]]], device=self.device),
            past_key_values=cache, use_cache=True,
        )
        row.state = (self._module_states(), cache)
        row.extra["position"] += 1
        return out.logits[0, -1].float()


class GenericBackend(FamilyBackend):
    """Any transformers causal LM (transformers, hybrids, SSMs without a family backend): each row
    runs alone, unpadded and without a cache, and every decode step re-runs the whole sequence.
    Quadratic in the length, but exact by construction: an oracle for models no family backend knows."""

    @torch.no_grad()
    def _last_logits(self, ids: TokenIds) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits[0, -1].float()

    def prefill(self, rows):
        return torch.stack([self._last_logits(row) for row in rows]), rows

    def take(self, batch_state, row):
        return RowState(list(batch_state[row]))

    def step(self, row, token_id):
        row.state.append(token_id)
        return self._last_logits(row.state)


class RwkvBackend(FamilyBackend):
    """The torch RWKV6 and RWKV7: explicit state tensors, pads masked inside the model."""

    @torch.no_grad()
    def prefill(self, rows):
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        logits, state = self.model(ids, attention_mask=mask)
        return logits[:, -1], state

    def take(self, batch_state, row):
        return RowState(batch_state.select(torch.tensor([row], device=self.device)))

    @torch.no_grad()
    def step(self, row, token_id):
        logits, row.state = self.model(torch.tensor([[token_id]], device=self.device), state=row.state)
        return logits[0, -1]


_BACKENDS = {
    "MambaForCausalLM": CacheFamilyBackend,
    "FalconMambaForCausalLM": CacheFamilyBackend,
    "Mamba2ForCausalLM": CacheFamilyBackend,
    "RecurrentGemmaForCausalLM": RecurrentGemmaBackend,
}


def backend_for(model: torch.nn.Module, pad_token_id: int) -> FamilyBackend:
    """The family backend of ``model``'s class (batched, padded, cached), or for any other
    transformers causal LM the slow, exact ``GenericBackend``."""
    if isinstance(model, (Rwkv6ForCausalLM, Rwkv7ForCausalLM)):
        return RwkvBackend(model, pad_token_id)
    return _BACKENDS.get(type(model).__name__, GenericBackend)(model, pad_token_id)
