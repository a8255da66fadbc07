"""RecurrentGemma (Griffin) for vLLM, built from vLLM's layers.

A hybrid model, as vLLM runs Jamba: the local-attention blocks are vLLM
``Attention`` layers with the checkpoint's sliding window (their keys and
values live in vLLM's paged KV cache, which frees blocks that slide out of the
window), and every recurrent block is a ``RecurrentStateLayer`` whose conv window
and fp32 RG-LRU state live in vLLM's recurrent-state manager. Its conv + RG-LRU
is one custom op over every row of the step (decodes as single steps, prefill
rows in one varlen call: fla's HGRN kernels on CUDA, a parallel scan in torch
elsewhere) reading and writing those states by slot; the rest is traced by
torch.compile.

Tensor parallelism: the embedding (tied head) by vocabulary; attention by
heads (the single key/value head of the published checkpoints is replicated);
the MLP by columns and rows; every recurrent block by channels, so its conv,
its RG-LRU (whose gates are block-diagonal by head) and its state split with
them. Checked against transformers' ``RecurrentGemmaForCausalLM``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import GeluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching

from ..ops.rglru import rglru_decode, rglru_varlen
from ..ops.varlen import RowLayout
from .parallel import load_by_name, rank_part
from .state_cache import RecurrentStateLayer, layer_of, register_layer_op, whole_state_copies

STATES = (RNN, CONV) = range(2)  # order of a recurrent block's states (fp32 first: aligned views)

# checkpoint name part -> (this model's stacked parameter, shard id), for load_by_name
STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def recurrent_state_shapes(config, ranks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per recurrent block and rank: the RG-LRU state (fp32) and the conv window."""
    if config.lru_width % ranks or config.num_attention_heads % ranks:
        raise ValueError(
            f"RecurrentGemma's lru_width {config.lru_width} and {config.num_attention_heads} heads must divide "
            f"by tensor_parallel_size {ranks}"
        )
    width = config.lru_width // ranks
    return (width,), (width, config.conv1d_width - 1)


class RecurrentGemmaMlp(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        half = config.intermediate_size // 2  # as transformers sizes it
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [half] * 2, bias=True, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(half, config.hidden_size, bias=True, prefix=f"{prefix}.down_proj")
        self.act = GeluAndMul(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)[0]))[0]


class RecurrentGemmaAttention(nn.Module):
    """Local multi-query attention with partial rotary embeddings, on vLLM's attention backend."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        ranks = get_tensor_model_parallel_world_size()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=config.attention_bias, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=True, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(head_dim, max_position=vllm_config.model_config.max_model_len, is_neox_style=True,
                                   rope_parameters=config.rope_parameters)
        heads, kv_heads = config.num_attention_heads // ranks, max(1, config.num_key_value_heads // ranks)
        self.sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        self.attn = Attention(
            heads, head_dim, head_dim**-0.5, num_kv_heads=kv_heads, cache_config=vllm_config.cache_config,
            per_layer_sliding_window=config.attention_window_size, prefix=f"{prefix}.attn",
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x)[0].split(self.sizes, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))[0]


class RecurrentGemmaRglru(nn.Module):
    """The real-gated linear recurrent unit; this rank's channels and gate heads."""

    def __init__(self, config, rank: int, ranks: int):
        super().__init__()
        width, heads = config.lru_width // ranks, config.num_attention_heads // ranks
        block = config.lru_width // config.num_attention_heads
        full_heads = config.num_attention_heads
        self.heads, self.block = heads, block
        self.recurrent_param = rank_part((width,), 0, rank, (config.lru_width,))
        for gate in ("input_gate", "recurrent_gate"):
            setattr(self, f"{gate}_weight", rank_part((heads, block, block), 0, rank, (full_heads, block, block)))
            setattr(self, f"{gate}_bias", rank_part((heads, block), 0, rank, (full_heads, block)))

    def gates(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scan's input and decay for tokens x [N, width] at ``positions``: position 0 restarts the
        recurrence (decay 0) and skips the input normalization, as in transformers."""
        tokens, width = x.shape
        per_head = x.reshape(tokens, self.heads, self.block)
        input_gate = torch.sigmoid(torch.einsum("thi,hij->thj", per_head, self.input_gate_weight) + self.input_gate_bias)
        recurrent_gate = torch.sigmoid(torch.einsum("thi,hij->thj", per_head, self.recurrent_gate_weight) + self.recurrent_gate_bias)
        log_a = -8.0 * recurrent_gate.reshape(tokens, width) * F.softplus(self.recurrent_param)
        reset = (positions == 0)[:, None]
        multiplier = torch.where(reset, 1.0, torch.sqrt(1 - torch.exp(2 * log_a)))
        normalized = x * input_gate.reshape(tokens, width) * multiplier.to(x.dtype)
        return normalized, torch.exp(log_a) * ~reset


class RecurrentGemmaRecurrentBlock(nn.Module, RecurrentStateLayer):
    """Gated branch times (linear, causal depthwise conv, RG-LRU) branch; its conv window and RG-LRU
    state live in vLLM's state manager, and the conv + RG-LRU of all rows is one custom op."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        width, lru, conv = config.lru_width // ranks, config.lru_width, config.conv1d_width
        self.linear_y = ColumnParallelLinear(config.hidden_size, lru, bias=True, prefix=f"{prefix}.linear_y")
        self.linear_x = ColumnParallelLinear(config.hidden_size, lru, bias=True, prefix=f"{prefix}.linear_x")
        self.linear_out = RowParallelLinear(lru, config.hidden_size, bias=True, prefix=f"{prefix}.linear_out")
        self.conv_1d = nn.Module()
        self.conv_1d.weight = rank_part((width, 1, conv), 0, rank, (lru, 1, conv))
        self.conv_1d.bias = rank_part((width,), 0, rank, (lru,))
        self.rg_lru = RecurrentGemmaRglru(config, rank, ranks)
        self.act = nn.GELU(approximate="tanh")
        self.init_states(recurrent_state_shapes(config, ranks), (torch.float32, vllm_config.model_config.dtype), vllm_config, prefix)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        gate = self.act(self.linear_y(x)[0])
        branch = self.linear_x(x)[0]
        out = torch.empty_like(branch)
        rglru(branch, positions, out, self.prefix)
        return self.linear_out(out * gate)[0]

    def recur(self, branch: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
        """Conv then RG-LRU over this step's rows [N, width], each from its cached states; stores the states after."""
        meta = self.step_metadata()
        if meta is None:  # vLLM's profiling and warm-up runs: no requests, no cache
            out.zero_()
            return
        d, p = meta.num_decodes, meta.num_prefill_tokens
        if d:
            conv = self.read_states(CONV, meta.slots_d, meta.continues_d).to(branch.dtype)
            window = torch.cat([conv, branch[:d, :, None]], dim=-1)  # [rows, width, W]
            convolved = (window * self.conv_1d.weight[:, 0]).sum(-1) + self.conv_1d.bias
            x, a = self.rg_lru.gates(convolved, positions[:d])
            y, rnn = rglru_decode(x, a, self.read_states(RNN, meta.slots_d, meta.continues_d))
            out[:d] = y
            self.write_states(CONV, meta.slots_d, window[..., 1:])
            self.write_states(RNN, meta.slots_d, rnn)
        if p:
            part, layout = slice(d, d + p), meta.layout_p
            window = self._windows(branch[part], self.read_states(CONV, meta.slots_p, meta.continues_p), layout)
            x, a = self.rg_lru.gates(self._conv(window, layout), positions[part])
            y, rnn = rglru_varlen(x, a, self.read_states(RNN, meta.slots_p, meta.continues_p), layout)
            out[part] = y
            keep = window.shape[-1] - layout.max_len  # the conv window: W - 1 tokens
            last = layout.lengths[:, None] + torch.arange(keep, device=window.device)
            self.write_states(CONV, meta.slots_p, window.gather(-1, last[:, None].expand(-1, window.shape[1], -1)))
            self.write_states(RNN, meta.slots_p, rnn)

    def _windows(self, branch: torch.Tensor, conv: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """Each row's cached conv window then its tokens, right-padded: [rows, width, W - 1 + max_len]."""
        return torch.cat([conv.to(branch.dtype), layout.pad(branch).transpose(1, 2)], dim=-1)

    def _conv(self, window: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """The causal depthwise conv at every token: [N, width]."""
        convolved = F.conv1d(window, self.conv_1d.weight, self.conv_1d.bias, groups=window.shape[1])
        return layout.unpad(convolved.transpose(1, 2))


def rglru_op(branch: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    layer_of(layer_name).recur(branch, positions, out)


rglru = register_layer_op("oprm_recurrent_gemma_rglru", rglru_op)


class RecurrentGemmaDecoderLayer(nn.Module):
    def __init__(self, config, kind: str, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.temporal_pre_norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        block = RecurrentGemmaRecurrentBlock if kind == "recurrent" else RecurrentGemmaAttention
        self.temporal_block = block(config, vllm_config, f"{prefix}.temporal_block")
        self.channel_pre_norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp_block = RecurrentGemmaMlp(config, f"{prefix}.mlp_block")

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual = self.temporal_block(self.temporal_pre_norm(hidden), positions) + hidden
        return self.mlp_block(self.channel_pre_norm(residual)) + residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class RecurrentGemmaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        kinds = config.layers_block_type[: config.num_hidden_layers]
        self.layers = nn.ModuleList(
            RecurrentGemmaDecoderLayer(config, kind, vllm_config, f"{prefix}.layers.{i}") for i, kind in enumerate(kinds)
        )
        self.final_norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # transformers keeps sqrt(hidden_size) as a bfloat16 constant: the same rounding here
        self.normalizer = float(torch.tensor(config.hidden_size**0.5, dtype=torch.bfloat16))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = hidden * self.normalizer
        for layer in self.layers:
            hidden = layer(hidden, positions)
        return self.final_norm(hidden)


class RecurrentGemmaForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return whole_state_copies(len(STATES))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.model = RecurrentGemmaModel(vllm_config=vllm_config, prefix=f"{prefix}model")
        if self.config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size, prefix=f"{prefix}lm_head")
        self.logits_processor = LogitsProcessor(self.config.vocab_size, soft_cap=self.config.logits_soft_cap)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return recurrent_state_shapes(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return torch.float32, vllm_config.model_config.dtype

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """transformers' checkpoint names; q/k/v and gate/up go into their stacked layers."""
        skip = "lm_head.weight" if self.config.tie_word_embeddings else None
        return load_by_name(self, weights, "RecurrentGemma", skip, stacked=STACKED)
