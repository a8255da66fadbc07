"""RWKV6 (Finch) for vLLM, built from vLLM's layers; each block's state in vLLM's state manager.

Every block is a ``RecurrentStateLayer`` holding three states per request: the
fp32 WKV matrix of each of its heads and the time-mix and channel-mix
token-shift vectors. The token shifts and the WKV recurrence are custom ops
that read and write those states by slot (decodes as one batch of single
steps, every prefill row of the step in one varlen call: fla's chunked kernel
on CUDA, the chunked parallel form in torch elsewhere); the rest is traced by
torch.compile. Checked against the torch reference in ``vllm_oprm.reference``.

Tensor parallelism: the embedding and the head are split by vocabulary, every
channel mix by columns (key) and rows (value), and every time mix by heads
(receptance, key, value and gate by columns, output by rows; the decay, bonus
and group norm of a rank's heads; so the WKV state is split by heads too). The
token-shift LoRAs, the channel mix's receptance and the shift states are
replicated: every rank needs them whole. Weights load one tensor at a time,
each rank taking its part; the LoRA sizes come from the checkpoint's tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching

from ..ops.wkv6 import wkv6_decode, wkv6_varlen
from .parallel import checkpoint_sized, load_by_name, rank_part
from .rwkv6_config import rwkv6_sizes
from .state_cache import RecurrentStateLayer, layer_of, register_layer_op, token_shift, whole_state_copies

STATES = (WKV, ATT_SHIFT, FFN_SHIFT) = range(3)  # order of a block's states (fp32 first: aligned views)


class Rwkv6TimeMix(nn.Module):
    """Data-dependent token shift and decay, WKV state per head (this rank's heads)."""

    def __init__(self, config, rank: int, ranks: int, prefix: str):
        super().__init__()
        sizes = rwkv6_sizes(config)
        if sizes.heads % ranks:
            raise ValueError(f"RWKV6 has {sizes.heads} heads, not divisible by tensor_parallel_size {ranks}")
        hidden, attn = config.hidden_size, sizes.attention
        self.heads, self.head_size = sizes.heads // ranks, config.head_size
        width = attn // ranks
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", rank_part((hidden,), 0, 0, (hidden,)))
        self.time_maa_w1 = checkpoint_sized()  # [hidden, 5 * lora]
        self.time_maa_w2 = checkpoint_sized()  # [5, lora, hidden]
        self.time_decay = rank_part((width,), 0, rank, (attn,))
        self.time_decay_w1 = checkpoint_sized()  # [hidden, lora]
        self.time_decay_w2 = checkpoint_sized(dim=1, rank=rank, ranks=ranks)  # [lora, attn] by heads
        self.time_faaaa = rank_part((self.heads, self.head_size), 0, rank, (sizes.heads, self.head_size))
        for name in ("receptance", "key", "value", "gate"):
            setattr(self, name, ColumnParallelLinear(hidden, attn, bias=False, prefix=f"{prefix}.{name}"))
        self.output = RowParallelLinear(attn, hidden, bias=False, prefix=f"{prefix}.output")
        self.ln_x = nn.Module()
        self.ln_x.weight = rank_part((width,), 0, rank, (attn,))
        self.ln_x.bias = rank_part((width,), 0, rank, (attn,))
        self.ln_x_eps = 1e-5 * getattr(config, "head_size_divisor", 8) ** 2

    def forward(self, x: torch.Tensor, layer_name: str) -> torch.Tensor:
        shifted = torch.empty_like(x)
        token_shift(x, shifted, layer_name, ATT_SHIFT)
        xx = shifted - x
        lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)
        lora = lora.view(x.shape[0], 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(lora, self.time_maa_w2).unbind(0)
        r = self.receptance(x + xx * (self.time_maa_r + mr))[0]
        k = self.key(x + xx * (self.time_maa_k + mk))[0]
        v = self.value(x + xx * (self.time_maa_v + mv))[0]
        g = F.silu(self.gate(x + xx * (self.time_maa_g + mg))[0])
        decay = self.time_decay + torch.tanh((x + xx * (self.time_maa_w + mw)) @ self.time_decay_w1) @ self.time_decay_w2
        out = torch.empty(x.shape[0], r.shape[1], dtype=torch.float32, device=x.device)
        wkv(r, k, v, -torch.exp(decay.float()), out, layer_name)
        out = F.group_norm(out, self.heads, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x_eps)
        return self.output(out.to(x.dtype) * g)[0]


class Rwkv6ChannelMix(nn.Module):
    """Token shift, squared-ReLU key, sigmoid receptance."""

    def __init__(self, config, prefix: str):
        super().__init__()
        hidden, inner = config.hidden_size, rwkv6_sizes(config).intermediate
        self.time_maa_k = rank_part((hidden,), 0, 0, (hidden,))
        self.time_maa_r = rank_part((hidden,), 0, 0, (hidden,))
        self.key = ColumnParallelLinear(hidden, inner, bias=False, prefix=f"{prefix}.key")
        self.receptance = ReplicatedLinear(hidden, hidden, bias=False, prefix=f"{prefix}.receptance")
        self.value = RowParallelLinear(inner, hidden, bias=False, prefix=f"{prefix}.value")

    def forward(self, x: torch.Tensor, layer_name: str) -> torch.Tensor:
        shifted = torch.empty_like(x)
        token_shift(x, shifted, layer_name, FFN_SHIFT)
        xx = shifted - x
        key = torch.square(torch.relu(self.key(x + xx * self.time_maa_k)[0]))
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)[0]) * self.value(key)[0]


class Rwkv6Block(nn.Module, RecurrentStateLayer):
    def __init__(self, config, layer_id: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        eps = getattr(config, "layer_norm_epsilon", 1e-5)
        hidden = config.hidden_size
        self.pre_ln = nn.LayerNorm(hidden, eps=eps) if layer_id == 0 else None
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.attention = Rwkv6TimeMix(config, rank, ranks, f"{prefix}.attention")
        self.feed_forward = Rwkv6ChannelMix(config, f"{prefix}.feed_forward")
        heads, size = self.attention.heads, config.head_size
        dtype = vllm_config.model_config.dtype
        self.init_states(((heads, size, size), (hidden,), (hidden,)), (torch.float32, dtype, dtype), vllm_config, prefix)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pre_ln is not None:
            hidden = self.pre_ln(hidden)
        hidden = hidden + self.attention(self.ln1(hidden), self.prefix)
        return hidden + self.feed_forward(self.ln2(hidden), self.prefix)

    def wkv(self, r, k, v, log_decay, out: torch.Tensor) -> None:
        """The WKV recurrence of this step's rows, each from its cached state; stores the states after."""
        meta = self.step_metadata()
        if meta is None:
            out.zero_()
            return
        heads, size = self.attention.heads, self.attention.head_size
        bonus = self.attention.time_faaaa
        d, p = meta.num_decodes, meta.num_prefill_tokens

        def rows(t: torch.Tensor, part: slice) -> torch.Tensor:
            return t[part].view(-1, heads, size)

        if d:
            part = slice(0, d)
            state = self.read_states(WKV, meta.slots_d, meta.continues_d)
            o, state = wkv6_decode(rows(r, part), rows(k, part), rows(v, part), rows(log_decay, part), bonus, state)
            out[part] = o.reshape(d, -1)
            self.write_states(WKV, meta.slots_d, state)
        if p:
            part = slice(d, d + p)
            state = self.read_states(WKV, meta.slots_p, meta.continues_p)
            o, state = wkv6_varlen(
                rows(r, part), rows(k, part), rows(v, part), rows(log_decay, part), bonus, state, meta.layout_p
            )
            out[part] = o.reshape(p, -1)
            self.write_states(WKV, meta.slots_p, state)


def wkv6_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    layer_of(layer_name).wkv(r, k, v, log_decay, out)


wkv = register_layer_op("oprm_rwkv6_wkv", wkv6_op)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class Rwkv6Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embeddings")
        self.blocks = nn.ModuleList(
            Rwkv6Block(config, i, vllm_config, f"{prefix}.blocks.{i}") for i in range(config.num_hidden_layers)
        )
        self.ln_out = nn.LayerNorm(config.hidden_size)  # the default eps, as upstream
        self.halve_every = 0  # set when fp16/bf16 weights were rescaled at load, as upstream does

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None):
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        for layer, block in enumerate(self.blocks):
            hidden = block(hidden)
            if self.halve_every and (layer + 1) % self.halve_every == 0:
                hidden = hidden / 2
        return self.ln_out(hidden)


class Rwkv6ForCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):
    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return whole_state_copies(len(STATES))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = config = vllm_config.model_config.hf_config
        self.dtype = vllm_config.model_config.dtype
        self.rwkv = Rwkv6Model(vllm_config=vllm_config, prefix=f"{prefix}rwkv")
        if config.tie_word_embeddings:
            self.head = self.rwkv.embeddings
        else:
            self.head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=f"{prefix}head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rwkv.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.rwkv(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named Finch weights, one tensor at a time; sharded parameters take their rank's part."""
        loaded = load_by_name(self, weights, "RWKV6", skip="head.weight" if self.config.tie_word_embeddings else None)
        self._rescale_for_half_precision()
        return loaded

    @torch.no_grad()
    def _rescale_for_half_precision(self) -> None:
        """Upstream's fp16 trick, as the reference applies it: shrink block outputs and halve the residual
        every ``rescale_every`` layers so activations stay in range."""
        every = getattr(self.config, "rescale_every", 6)
        if self.dtype not in (torch.float16, torch.bfloat16) or every <= 0:
            return
        for layer, block in enumerate(self.rwkv.blocks):
            block.attention.output.weight.div_(2 ** (layer // every))
            block.feed_forward.value.weight.div_(2 ** (layer // every))
        self.rwkv.halve_every = every
