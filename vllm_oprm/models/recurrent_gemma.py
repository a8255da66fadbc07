"""RecurrentGemma (Griffin) for vLLM: transformers' layers, each request's state in vLLM's state cache.

The whole model's state is one ``MambaBase`` layer: per recurrent block the
conv window and the fp32 RG-LRU state, per local-attention block the last
``attention_window_size - 1`` keys and values (a fixed-size window, so it is a
recurrent state too) and the token count. One layer keeps vLLM's state pages
uniform. The compute is transformers' ``RecurrentGemmaForCausalLM`` run per
request with that state installed, so the class equals transformers by
construction.

The part of a prompt that continues from an earlier engine step (chunked
prefill) runs in one pass: transformers' recurrent block would restart its conv
window on a multi-token input, so ``continue_recurrent_block`` prepends the
cached window, and the attention gets a sliding-window mask over the cached and
the new keys. Not sharded (no tensor parallelism); eager only.
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


def continuation_mask(first: int, length: int, kept: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, length, kept + length] mask for queries at ``first..first+length-1`` over the
    ``kept`` cached keys just before ``first`` and the new ones: causal, within ``window`` tokens."""
    queries = torch.arange(first, first + length)[:, None]
    keys = torch.arange(first - kept, first + length)[None, :]
    allowed = (keys <= queries) & (queries - keys < window)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


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

    def views(self, slot: int) -> tuple[list, list, list, list, list]:
        """This slot's (rnn, count, conv, keys, values) tensors, one per block of each kind."""
        r, a = len(self.recurrent), len(self.attention)
        states = [state[slot] for state in self.kv_cache]
        rnn, count, conv = states[:r], states[r : r + a], states[r + a : 2 * r + a]
        kv = states[2 * r + a :]
        return rnn, count, conv, kv[0::2], kv[1::2]


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
        for i in range(meta.num_decodes + meta.num_prefills):
            start, end = starts[i], starts[i + 1]
            if slots[i] < 0:
                continue
            fresh = lengths[i] == end - start  # nothing of this request computed before
            hidden[start:end] = self._run(input_ids[start:end], positions[start:end], slots[i], fresh)
        return hidden

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot: int, fresh: bool) -> torch.Tensor:
        from transformers import DynamicCache

        rnn, count, conv, keys, values = self.state.views(slot)
        blocks = self.hf.model.layers
        cache = DynamicCache(config=self.config)
        if fresh:
            self.hf.model._setup_cache(self.config, 1, input_ids.device, self.hf.dtype)
        else:
            for layer, rnn_state, conv_state in zip(self.state.recurrent, rnn, conv):
                blocks[layer].temporal_block.rg_lru.recurrent_states = rnn_state[None].clone()
                blocks[layer].temporal_block.conv1d_state = conv_state[None].clone()
            for layer, seen, k, v in zip(self.state.attention, count, keys, values):
                seen = int(seen.item())
                kept = min(seen, k.shape[1])
                cached = cache.layers[layer]
                cached.lazy_initialization(k[None, :, :0], v[None, :, :0])
                cached.keys, cached.values = k[None, :, k.shape[1] - kept :].clone(), v[None, :, v.shape[1] - kept :].clone()
                cached.cumulative_length = seen
        mask = None
        if not fresh and input_ids.shape[0] > 1:  # a chunked prefill's continuation
            kept = min(int(count[0].item()), keys[0].shape[1]) if self.state.attention else 0
            mask = continuation_mask(int(positions[0]), input_ids.shape[0], kept, self.config.attention_window_size,
                                     self.hf.dtype).to(input_ids.device)
        hidden = self.hf.model(
            input_ids=input_ids[None], position_ids=positions[None], attention_mask=mask,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state[0]
        for layer, rnn_state, conv_state in zip(self.state.recurrent, rnn, conv):
            rnn_state.copy_(blocks[layer].temporal_block.rg_lru.recurrent_states[0])
            conv_state.copy_(blocks[layer].temporal_block.conv1d_state[0])
        for layer, seen, k, v in zip(self.state.attention, count, keys, values):
            cached = cache.layers[layer]
            kept = cached.keys.shape[-2]
            seen.fill_(cached.cumulative_length)
            k[:, k.shape[1] - kept :].copy_(cached.keys[0])
            v[:, v.shape[1] - kept :].copy_(cached.values[0])
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
