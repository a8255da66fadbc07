"""RecurrentGemma (Griffin) for vLLM: transformers' layers, each request's state in vLLM's state cache.

The whole model's state is one ``MambaBase`` layer: per recurrent block the
conv window and the fp32 RG-LRU state, per local-attention block the last
``attention_window_size - 1`` keys and values (a fixed-size window, so it is a
recurrent state too) and the token count. One layer keeps vLLM's state pages
uniform. The compute is transformers' ``RecurrentGemmaForCausalLM`` with
those states installed, so the class equals transformers by construction: a
whole prompt runs alone, as transformers runs it; decodes run batched, and the
part of a prompt that continues from an earlier engine step (chunked prefill)
in one pass. Both get every cached attention window and a mask keeping each
row's valid keys within its window; a continuation's recurrent block convolves
over its cached conv window (``continue_recurrent_block``), which transformers
would restart on a multi-token input. Not sharded (no tensor parallelism);
eager only.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree

from .state_cache import StateCache


def continue_recurrent_block(block, input_states, position_ids, attention_mask, use_cache=True, **kwargs):
    """transformers' ``RecurrentGemmaRecurrentBlock.forward``, except that a multi-token input that
    continues a sequence (first position > 0) convolves over the cached conv window before it, as a
    token-by-token run would; the RG-LRU already continues from its cached state."""
    if not use_cache or input_states.shape[1] == 1 or int(position_ids[0, 0]) == 0:
        return type(block).forward(block, input_states, position_ids, attention_mask, use_cache, **kwargs)
    y_branch = block.act_fn(block.linear_y(input_states))
    x_branch = torch.cat((block.conv1d_state, block.linear_x(input_states).transpose(1, 2)), dim=-1)
    block.conv1d_state = x_branch[..., -(block.conv1d_width - 1) :]
    x_branch = F.conv1d(x_branch, block.conv_1d.weight, block.conv_1d.bias, groups=block.conv_1d.groups)
    x_branch = block.rg_lru(x_branch.transpose(1, 2), position_ids)
    return block.linear_out(x_branch * y_branch), None


def window_mask(first: torch.Tensor, length: int, kept: torch.Tensor, slots: int, window: int, dtype) -> torch.Tensor:
    """Additive [rows, 1, length, slots + length] attention mask for rows whose queries sit at
    ``first[b]..first[b]+length-1``, over ``slots`` cached keys (row b's valid ones are the last
    ``kept[b]``, just before ``first[b]``) and the new keys: causal, within ``window`` tokens."""
    queries = first[:, None, None] + torch.arange(length)[None, :, None]
    keys = first[:, None, None] - slots + torch.arange(slots + length)[None, None, :]
    cached_valid = torch.arange(slots + length)[None, None, :] >= slots - kept[:, None, None]
    allowed = cached_valid & (keys <= queries) & (queries - keys < window)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class GriffinStateCache(StateCache):
    """The whole model's per-request state, laid out by block kind."""

    def __init__(self, config, dtype: torch.dtype, vllm_config: VllmConfig, prefix: str):
        kinds = config.layers_block_type[: config.num_hidden_layers]
        recurrent = [i for i, kind in enumerate(kinds) if kind == "recurrent"]
        attention = [i for i, kind in enumerate(kinds) if kind == "attention"]
        r, a = len(recurrent), len(attention)
        kv = (config.num_key_value_heads, config.attention_window_size - 1, config.head_dim)
        shapes = [(config.lru_width,)] * r + [(1,)] * a + [(config.lru_width, config.conv1d_width - 1)] * r + [kv, kv] * a
        dtypes = [torch.float32] * (r + a) + [dtype] * (r + 2 * a)  # fp32 first
        super().__init__(shapes, dtypes, vllm_config, prefix)
        self.recurrent, self.attention = recurrent, attention

    def views(self, index: torch.Tensor) -> tuple[list, list, list, list, list]:
        """The (rnn, count, conv, keys, values) states of the slots in ``index``, one per block of each
        kind, gathered into [rows, ...] tensors."""
        r, a = len(self.recurrent), len(self.attention)
        states = [state[index] for state in self.kv_cache]
        kv = states[2 * r + a :]
        return states[:r], states[r : r + a], states[r + a : 2 * r + a], kv[0::2], kv[1::2]

    def store(self, index: torch.Tensor, rnn, count, conv, keys, values) -> None:
        for state, new in zip(self.kv_cache, [*rnn, *count, *conv, *(t for kv in zip(keys, values) for t in kv)]):
            state[index] = new.to(state.dtype)


class RecurrentGemmaForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        from transformers import RecurrentGemmaForCausalLM as HFRecurrentGemma

        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError("RecurrentGemma in vllm-oprm is not sharded: run it with tensor_parallel_size=1")

        self.config = vllm_config.model_config.hf_config
        self.hf = HFRecurrentGemma(self.config)
        for layer in self.hf.model.layers:
            if hasattr(layer.temporal_block, "rg_lru"):
                layer.temporal_block.forward = types.MethodType(continue_recurrent_block, layer.temporal_block)
        self.state = GriffinStateCache(self.config, vllm_config.model_config.dtype, vllm_config, f"{prefix}state.0.cache")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # vLLM's profiling and warm-up runs: no requests, no cache
            return self.hf.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False).last_hidden_state[0]
        meta = metadata[self.state.prefix]
        hidden = torch.zeros(input_ids.shape[0], self.config.hidden_size, dtype=self.hf.dtype, device=input_ids.device)
        starts, lengths, slots = meta.query_start_loc.tolist(), meta.seq_lens.tolist(), meta.state_indices_tensor.tolist()
        decodes = [i for i in range(meta.num_decodes) if slots[i] >= 0]
        if decodes:  # one token each, first in the batch: one batched step
            at = torch.tensor([starts[i] for i in decodes], device=input_ids.device)
            fresh = [lengths[i] == 1 for i in decodes]  # a new one-token prompt starts from zero
            hidden[at] = self._run(input_ids[at][:, None], positions[at][:, None], [slots[i] for i in decodes], fresh)[:, 0]
        for i in range(meta.num_decodes, meta.num_decodes + meta.num_prefills):
            start, end = starts[i], starts[i + 1]
            if slots[i] < 0:
                continue
            fresh = lengths[i] == end - start  # nothing of this request computed before
            hidden[start:end] = self._run(input_ids[None, start:end], positions[None, start:end], [slots[i]], [fresh])[0]
        return hidden

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: list[int], fresh: list[bool]) -> torch.Tensor:
        """Rows of equal length [rows, length] from their cached states (zeros where fresh); stores the states after them.

        A whole fresh prompt runs as transformers runs it. Anything else (decodes, a chunked prefill's
        continuation) gets every cached attention window in full and a mask that keeps each row's valid
        keys and its own window."""
        from transformers import DynamicCache

        device, rows, length = input_ids.device, input_ids.shape[0], input_ids.shape[1]
        index = torch.tensor(slots, device=device)
        rnn, count, conv, keys, values = self.state.views(index)
        blocks = self.hf.model.layers
        cache = DynamicCache(config=self.config)
        mask = None
        whole_prompt = rows == 1 and fresh[0]
        if whole_prompt:
            self.hf.model._setup_cache(self.config, 1, device, self.hf.dtype)
            count = [torch.zeros_like(seen) for seen in count]
        else:
            keep = torch.tensor([not f for f in fresh], device=device)
            rnn = [state * keep[:, None] for state in rnn]
            conv = [state * keep[:, None, None].to(state.dtype) for state in conv]
            count = [seen * keep[:, None] for seen in count]
            for layer, rnn_state, conv_state in zip(self.state.recurrent, rnn, conv):
                blocks[layer].temporal_block.rg_lru.recurrent_states = rnn_state.clone()
                blocks[layer].temporal_block.conv1d_state = conv_state.clone()
            slots_kv = keys[0].shape[2] if keys else 0
            for layer, k, v in zip(self.state.attention, keys, values):  # gathered copies: the cache may keep them
                cached = cache.layers[layer]
                cached.lazy_initialization(k, v)
                cached.keys, cached.values, cached.cumulative_length = k, v, slots_kv
            kept = count[0][:, 0].long().clamp(max=slots_kv) if count else torch.zeros(rows, dtype=torch.long)
            mask = window_mask(positions[:, 0].cpu(), length, kept.cpu(), slots_kv, self.config.attention_window_size,
                               self.hf.dtype).to(device)
        hidden = self.hf.model(
            input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True
        ).last_hidden_state
        rnn = [blocks[layer].temporal_block.rg_lru.recurrent_states for layer in self.state.recurrent]
        conv = [blocks[layer].temporal_block.conv1d_state for layer in self.state.recurrent]
        count = [seen + length for seen in count]
        for layer, k, v in zip(self.state.attention, keys, values):  # the cache replaced its keys: k, v are free
            cached = cache.layers[layer]
            kept = cached.keys.shape[-2]  # a whole prompt shorter than the window keeps fewer: right-aligned
            k[:, :, k.shape[2] - kept :], v[:, :, v.shape[2] - kept :] = cached.keys, cached.values
        self.state.store(index, rnn, count, conv, keys, values)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cap = self.config.logits_soft_cap
        return torch.tanh(self.hf.lm_head(hidden_states) / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = dict(weights)
        missing, unexpected = self.hf.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"unexpected RecurrentGemma weights {unexpected[:3]}")
        if self.config.tie_word_embeddings:
            self.hf.lm_head.weight = self.hf.model.embed_tokens.weight
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing:
            raise ValueError(f"checkpoint lacks RecurrentGemma weights {missing[:3]}")
        return {f"hf.{name}" for name, _ in self.hf.named_parameters()}
