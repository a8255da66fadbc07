"""RWKV6 (Finch) for vLLM: the torch reference's layers, each request's state in vLLM's state cache.

Every block's state (the fp32 WKV matrix per head, the time-mix and the
channel-mix token-shift vectors) lives in one ``StateCache`` layer that
vLLM's recurrent-state manager allocates per request, exactly as for Mamba.
The recurrence is ``vllm_oprm.ops.wkv6.wkv6`` through the reference model
(the torch reference on CPU, fla's Triton kernels on CUDA), so this class
equals the reference by construction; decodes run batched, prefills one request at a time.

Tensor parallelism: the embedding and the head are split by vocabulary, every
channel mix by columns (key) and rows (value), and every time mix by heads
(receptance, key, value and gate by columns, output by rows; the decay, bonus
and group norm of a rank's heads; so the WKV state is split by heads too). The
token-shift LoRAs, the receptance of the channel mix and the shift states are
replicated: every rank needs them whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree

from ..reference.rwkv6 import Rwkv6Config, Rwkv6State
from ..reference.rwkv6 import Rwkv6ForCausalLM as Rwkv6Reference
from .parallel import rank_part
from .state_cache import StateCache

WKV, ATT_SHIFT, FFN_SHIFT = range(3)  # order of the states in a cache block (fp32 first: aligned views)


class _ColumnParallel(ColumnParallelLinear):
    """Returns the output alone, as the reference's ``nn.Linear`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _RowParallel(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def shard_time_mix(attention: nn.Module, config: Rwkv6Config, rank: int, ranks: int, prefix: str) -> None:
    """Give ``attention`` (the reference's time mix) only this rank's heads."""
    if config.num_heads % ranks:
        raise ValueError(f"RWKV6 has {config.num_heads} heads, not divisible by tensor_parallel_size {ranks}")
    hidden, attn, heads = config.hidden_size, config.attention_hidden_size, config.num_heads // ranks
    width = attn // ranks
    for name in ("receptance", "key", "value", "gate"):
        setattr(attention, name, _ColumnParallel(hidden, attn, bias=False, prefix=f"{prefix}.{name}"))
    attention.output = _RowParallel(attn, hidden, bias=False, prefix=f"{prefix}.output")
    attention.num_heads = heads
    extra = config.time_decay_extra_dim
    attention.time_decay = rank_part((1, 1, width), 2, rank, (1, 1, attn))
    attention.time_decay_w2 = rank_part((extra, width), 1, rank, (extra, attn))
    attention.time_faaaa = rank_part((heads, config.head_size), 0, rank, (config.num_heads, config.head_size))
    attention.ln_x = nn.GroupNorm(heads, width, eps=attention.ln_x.eps)
    attention.ln_x.weight = rank_part((width,), 0, rank, (attn,))
    attention.ln_x.bias = rank_part((width,), 0, rank, (attn,))


class Rwkv6ForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = Rwkv6Config.from_dict(vllm_config.model_config.hf_config.to_dict())
        self.reference = Rwkv6Reference(self.config)
        dtype = vllm_config.model_config.dtype
        c = self.config
        rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self.heads = c.num_heads // ranks
        self.reference.rwkv.embeddings = VocabParallelEmbedding(c.vocab_size, c.hidden_size, prefix=f"{prefix}embeddings")
        self.reference.head = ParallelLMHead(c.vocab_size, c.hidden_size, prefix=f"{prefix}head")
        self.logits_processor = LogitsProcessor(c.vocab_size)
        for layer, block in enumerate(self.reference.rwkv.blocks):
            name = f"{prefix}blocks.{layer}.feed_forward"
            block.feed_forward.key = _ColumnParallel(c.hidden_size, c.intermediate_size, bias=False, prefix=f"{name}.key")
            block.feed_forward.value = _RowParallel(c.intermediate_size, c.hidden_size, bias=False, prefix=f"{name}.value")
            shard_time_mix(block.attention, c, rank, ranks, f"{prefix}blocks.{layer}.attention")
        shapes = ((self.heads, c.head_size, c.head_size), (c.hidden_size,), (c.hidden_size,))  # WKV, ATT_SHIFT, FFN_SHIFT
        self.states = nn.ModuleList(
            StateCache(shapes, (torch.float32, dtype, dtype), vllm_config, f"{prefix}states.{layer}.cache")
            for layer in range(c.num_hidden_layers)
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.reference.rwkv.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # vLLM's profiling and warm-up runs: no requests, no cache
            state = Rwkv6State.zeros(self.config, 1, self.reference.dtype, input_ids.device, num_heads=self.heads)
            return self.reference.backbone(input_ids[None], state)[0][0]
        hidden = torch.zeros(input_ids.shape[0], self.config.hidden_size, dtype=self.reference.dtype, device=input_ids.device)
        for tokens, slots, fresh in self.states[0].row_groups(metadata, input_ids.device):
            hidden[tokens] = self._run(input_ids[tokens], slots, fresh)
        return hidden

    def _run(self, input_ids: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Run rows from their cached states (zeros where fresh) and store the states after them."""
        per_layer = [layer.read(slots, fresh) for layer in self.states]  # [WKV, ATT_SHIFT, FFN_SHIFT] each
        state = Rwkv6State(*(torch.stack([states[which] for states in per_layer]) for which in (ATT_SHIFT, WKV, FFN_SHIFT)))
        hidden, state = self.reference.backbone(input_ids, state)
        for layer, cache in enumerate(self.states):
            cache.write(slots, (state.wkv[layer], state.att_shift[layer], state.ffn_shift[layer]))
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.reference.head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named Finch weights; sharded layers take their rank's part through vLLM's loaders."""
        self.reference.load_checkpoint_weights(dict(weights))
        self.reference.rescale_for_half_precision()
        return {f"reference.{name}" for name, _ in self.reference.named_parameters()}
