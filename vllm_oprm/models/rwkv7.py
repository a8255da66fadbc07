"""RWKV7 (Goose) for vLLM, as flash-linear-attention 0.6 defines it, built from vLLM's layers; each block's
state in vLLM's state manager.

Every block is a ``RecurrentStateLayer`` holding three states per request: the fp32 WKV matrix of each of
its heads and the time-mix and channel-mix token-shift vectors. The token shifts and the WKV recurrence are
custom ops that read and write those states by slot (decodes as one batch of single steps, every prefill row
of the step in one varlen call: fla's chunked kernel on CUDA, the chunked parallel form in torch elsewhere);
the rest is traced by torch.compile. The value residual (every later layer leans its value towards layer 0's
value of the same token) is recomputed for every token within the forward, so it is not state. Checked
against the torch reference in ``vllm_oprm.reference``.

Tensor parallelism by heads, as RWKV6: the embedding and the head by vocabulary, the channel mix's key by
columns and value by rows; in the time mix receptance, key, value and every LoRA's up projection by columns,
output by rows, and the per-channel k_k, k_a, r_k and group norm of a rank's heads (so the WKV state is split
by heads too). The token-shift mixes, the LoRAs' down projections and the shift states are replicated: every
rank needs them whole.
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

from ..ops.wkv7 import LOG_DECAY_FLOOR, wkv7_decode, wkv7_varlen
from .parallel import load_by_name, rank_part
from .rwkv7_config import rwkv7_sizes
from .state_cache import RecurrentStateLayer, layer_of, register_layer_op, token_shift, whole_state_copies

STATES = (WKV, ATT_SHIFT, FFN_SHIFT) = range(3)  # order of a block's states (fp32 first: aligned views)
_FUSED_L2_EPS = 1e-6  # fla's fused l2 norm (``fuse_norm``) adds it under the square root
# a time mix's token-shift mixes, in the order of its inputs r, w, k, v, a, g (and of the rows of the old x_x)
TOKEN_SHIFT_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


class Rwkv7LoRA(nn.Module):
    """fla's LoRA, ``lora.2(activation(lora.0(x)))``: the down projection whole on every rank, the up
    projection by columns (this rank's heads)."""

    def __init__(self, hidden: int, rank: int, activation: nn.Module, bias: bool, prefix: str):
        super().__init__()
        self.lora = nn.ModuleDict({
            "0": ReplicatedLinear(hidden, rank, bias=False, prefix=f"{prefix}.lora.0"),
            "2": ColumnParallelLinear(rank, hidden, bias=bias, prefix=f"{prefix}.lora.2"),
        })
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora["2"](self.activation(self.lora["0"](x)[0]))[0]


class Rwkv7TimeMix(nn.Module):
    """Token shift, LoRA decay, in-context learning rate, value residual and gate; WKV7 per head (this rank's)."""

    def __init__(self, config, layer_id: int, rank: int, ranks: int, prefix: str):
        super().__init__()
        sizes = rwkv7_sizes(config)
        if sizes.heads % ranks:
            raise ValueError(f"RWKV7 has {sizes.heads} heads, not divisible by tensor_parallel_size {ranks}")
        hidden = config.hidden_size
        self.heads, self.head_dim = sizes.heads // ranks, sizes.head_dim
        width = hidden // ranks
        for mix in TOKEN_SHIFT_MIXES:
            setattr(self, mix, rank_part((hidden,), 0, 0, (hidden,)))  # stored [1, 1, hidden]
        self.k_k = rank_part((width,), 0, rank, (hidden,))
        self.k_a = rank_part((width,), 0, rank, (hidden,))
        self.r_k = rank_part((self.heads, self.head_dim), 0, rank, (sizes.heads, self.head_dim))
        for name in ("r_proj", "k_proj", "v_proj"):
            setattr(self, name, ColumnParallelLinear(hidden, hidden, bias=False, prefix=f"{prefix}.{name}"))
        self.o_proj = RowParallelLinear(hidden, hidden, bias=False, prefix=f"{prefix}.o_proj")
        self.w_lora = Rwkv7LoRA(hidden, sizes.decay_rank, nn.Tanh(), True, f"{prefix}.w_lora")
        # layer 0's value is every later layer's v_first: only those mix it in
        self.v_lora = Rwkv7LoRA(hidden, sizes.v_rank, nn.Identity(), True, f"{prefix}.v_lora") if layer_id else None
        self.a_lora = Rwkv7LoRA(hidden, sizes.a_rank, nn.Identity(), True, f"{prefix}.a_lora")
        self.g_lora = Rwkv7LoRA(hidden, sizes.gate_rank, nn.Sigmoid(), False, f"{prefix}.g_lora")
        self.g_norm = nn.Module()
        self.g_norm.weight = rank_part((width,), 0, rank, (hidden,))
        self.g_norm.bias = rank_part((width,), 0, rank, (hidden,))
        self.g_norm_eps = self.head_dim * getattr(config, "norm_eps", 1e-5)
        self.fused_l2 = getattr(config, "fuse_norm", True)

    def removal_key(self, k: torch.Tensor) -> torch.Tensor:
        """kk: ``k * k_k`` of unit norm per head, with the epsilon of the norm fla picks (``fuse_norm``)."""
        kk = (k * self.k_k).view(k.shape[0], self.heads, self.head_dim)
        if self.fused_l2:
            return kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + _FUSED_L2_EPS)
        return F.normalize(kk, dim=-1)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, layer_name: str):
        """x: the normed input [N, hidden]; v_first: layer 0's value of the same tokens (None in layer 0).
        Returns the time mix's output and v_first."""
        shifted = torch.empty_like(x)
        token_shift(x, shifted, layer_name, ATT_SHIFT)
        delta = shifted - x
        xr, xw, xk, xv, xa, xg = (
            torch.addcmul(x, delta, getattr(self, mix)) for mix in TOKEN_SHIFT_MIXES
        )
        r = self.r_proj(xr)[0]
        log_decay = LOG_DECAY_FLOOR * torch.sigmoid(self.w_lora(xw))
        k = self.k_proj(xk)[0]
        v = self.v_proj(xv)[0]
        if v_first is None:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v_lora(xv)))
        iclr = torch.sigmoid(self.a_lora(xa))  # the in-context learning rate
        g = self.g_lora(xg)
        kk = self.removal_key(k)
        k = k.addcmul(k * (iclr - 1), self.k_a)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], self.heads, self.head_dim)

        r, log_decay, k, v, iclr = (heads(t) for t in (r, log_decay, k, v, iclr))
        out = torch.empty(x.shape[0], self.heads * self.head_dim, dtype=torch.float32, device=x.device)
        wkv(r, log_decay, k, v, -kk, kk * iclr, out, layer_name)
        out = F.group_norm(out, self.heads, self.g_norm.weight.float(), self.g_norm.bias.float(), self.g_norm_eps)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # the current token's own r.k term
        return self.o_proj((out.to(x.dtype) + bonus.flatten(1)) * g)[0], v_first


class Rwkv7ChannelMix(nn.Module):
    """Token shift and a squared-ReLU key (no receptance gate, unlike RWKV6)."""

    def __init__(self, config, prefix: str):
        super().__init__()
        hidden, inner = config.hidden_size, rwkv7_sizes(config).intermediate
        self.x_k = rank_part((hidden,), 0, 0, (hidden,))
        self.key = ColumnParallelLinear(hidden, inner, bias=False, prefix=f"{prefix}.key")
        self.value = RowParallelLinear(inner, hidden, bias=False, prefix=f"{prefix}.value")

    def forward(self, x: torch.Tensor, layer_name: str) -> torch.Tensor:
        shifted = torch.empty_like(x)
        token_shift(x, shifted, layer_name, FFN_SHIFT)
        return self.value(torch.square(torch.relu(self.key(torch.addcmul(x, shifted - x, self.x_k))[0])))[0]


class Rwkv7Block(nn.Module, RecurrentStateLayer):
    def __init__(self, config, layer_id: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        rank, ranks = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        hidden = config.hidden_size

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(hidden, eps=getattr(config, "norm_eps", 1e-5), bias=getattr(config, "norm_bias", True))

        self.pre_norm = norm() if layer_id == 0 and getattr(config, "norm_first", True) else None
        self.attn_norm = norm()
        self.attn = Rwkv7TimeMix(config, layer_id, rank, ranks, f"{prefix}.attn")
        self.ffn_norm = norm()
        self.ffn = Rwkv7ChannelMix(config, f"{prefix}.ffn")
        heads, size = self.attn.heads, self.attn.head_dim
        dtype = vllm_config.model_config.dtype
        shapes = ((heads, size, size), (hidden,), (hidden,))
        self.init_states(shapes, (torch.float32, dtype, dtype), vllm_config, prefix)

    def forward(self, hidden: torch.Tensor, v_first: torch.Tensor | None):
        residual = hidden if self.pre_norm is None else self.pre_norm(hidden)
        out, v_first = self.attn(self.attn_norm(residual), v_first, self.prefix)
        hidden = residual + out
        return hidden + self.ffn(self.ffn_norm(hidden), self.prefix), v_first

    def wkv(self, r, log_decay, k, v, a, b, out: torch.Tensor) -> None:
        """The WKV recurrence of this step's rows, each from its cached state; stores the states after."""
        meta = self.step_metadata()
        if meta is None:
            out.zero_()
            return
        d, p = meta.num_decodes, meta.num_prefill_tokens
        inputs = (r, log_decay, k, v, a, b)
        if d:
            state = self.read_states(WKV, meta.slots_d, meta.continues_d)
            o, state = wkv7_decode(*(t[:d] for t in inputs), state)
            out[:d] = o.reshape(d, -1)
            self.write_states(WKV, meta.slots_d, state)
        if p:
            state = self.read_states(WKV, meta.slots_p, meta.continues_p)
            o, state = wkv7_varlen(*(t[d : d + p] for t in inputs), state, meta.layout_p)
            out[d : d + p] = o.reshape(p, -1)
            self.write_states(WKV, meta.slots_p, state)


def wkv7_op(
    r: torch.Tensor, log_decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    out: torch.Tensor, layer_name: str,
) -> None:
    layer_of(layer_name).wkv(r, log_decay, k, v, a, b, out)


wkv = register_layer_op("oprm_rwkv7_wkv", wkv7_op)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class Rwkv7Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embeddings")
        self.layers = nn.ModuleList(
            Rwkv7Block(config, i, vllm_config, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(
            config.hidden_size, eps=getattr(config, "norm_eps", 1e-5), bias=getattr(config, "norm_bias", True)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None):
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        v_first = None
        for block in self.layers:
            hidden, v_first = block(hidden, v_first)
        return self.norm(hidden)


class RWKV7ForCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):
    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return whole_state_copies(len(STATES))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = config = vllm_config.model_config.hf_config
        self.model = Rwkv7Model(vllm_config=vllm_config, prefix=f"{prefix}model")
        if config.tie_word_embeddings:
            self.lm_head = self.model.embeddings
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=f"{prefix}lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs
    ):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """fla-named RWKV7 weights, one tensor at a time; sharded parameters take their rank's part."""
        skip = "lm_head.weight" if self.config.tie_word_embeddings else None
        return load_by_name(self, split_token_shift_mixes(weights), "RWKV7", skip)


def split_token_shift_mixes(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """fla's first RWKV7 checkpoints stack a time mix's six token-shift mixes in one ``attn.x_x`` [6, hidden];
    fla 0.6 splits it when it loads one (``RWKV7ForCausalLM.load_state_dict``), and so does this."""
    for name, tensor in weights:
        if name.endswith(".attn.x_x"):
            for mix, part in zip(TOKEN_SHIFT_MIXES, tensor):
                yield name.removesuffix("x_x") + mix, part.reshape(1, 1, -1)
        else:
            yield name, tensor
