"""RWKV7 (Goose) causal LM in plain torch, reading flash-linear-attention's Hugging Face checkpoints.

fla's own ``RWKV7ForCausalLM`` runs only through Triton kernels, so this is the oracle the OPRM
backends and the vLLM model are checked against: every recurrence runs one token at a time (the WKV
state through ``vllm_oprm.ops.wkv7.wkv7_recurrent_ref``). Module and parameter names follow fla 0.6 (``model.layers.N.attn.w_lora.lora.0.weight``,
``lm_head.weight``, ...), so a checkpoint saved by fla's ``save_pretrained`` loads as it is.

For the IDK filter, RWKV7 "world" models use RWKV's world tokenizer: in its vocabulary file
``rwkv_vocab_v20230424.txt`` "Error" is token id 33079 and " Error" is 36638, each one token
(checked with the copy and the tokenizer in PyPI's ``rwkv`` 0.8.32).

The model is built with empty parameters: ``from_pretrained`` fills every one (strictly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.wkv7 import LOG_DECAY_FLOOR, wkv7_recurrent_ref
from .rwkv6 import _token_shift

ARCHITECTURE = "RWKV7ForCausalLM"  # as fla writes it into config.json

# fla's fused l2 norm (used when ``fuse_norm``) adds this inside the square root
_FUSED_L2_EPS = 1e-6


@dataclass
class Rwkv7Config:
    """The fields of fla's ``RWKV7Config`` that inference reads, with fla's defaults."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    head_dim: int | None = 64
    num_heads: int | None = None
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    decay_low_rank_dim: int = 64  # LoRA ranks; from_pretrained reads them from the weights
    gate_low_rank_dim: int = 128
    a_low_rank_dim: int = 64
    v_low_rank_dim: int = 16
    value_dim: int | list[int] | None = None
    hidden_act: str = "sqrelu"
    norm_first: bool = True
    norm_bias: bool = True
    norm_eps: float = 1e-5
    fuse_norm: bool = True  # picks fla's l2 norm of the removal key (fused: eps inside the root)
    attn: dict | None = None  # fla's hybrid softmax-attention layers: not supported here
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    model_type: str = "rwkv7"
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])

    def __post_init__(self) -> None:
        if self.attn is not None:
            raise ValueError("RWKV7 checkpoints with softmax-attention layers (config.attn) are not supported")
        if self.hidden_act != "sqrelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; fla's RWKV7 uses 'sqrelu'")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.num_heads = self.hidden_size // self.head_dim
        if self.intermediate_size is None:  # fla: hidden * ratio, rounded up to a multiple of 32
            self.intermediate_size = 32 * -(-self.hidden_size * (self.hidden_ratio or 4) // 32)
        if not isinstance(self.value_dim, list):
            self.value_dim = [self.value_dim or self.hidden_size] * self.num_hidden_layers

    @classmethod
    def from_dict(cls, values: dict) -> "Rwkv7Config":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Rwkv7State:
    """Per-layer recurrent state: the two token-shift vectors and the fp32 WKV matrix per head.

    The value residual (layer 0's v mixed into later layers' v) is recomputed for every token
    from that token's own layer-0 v, so it is not state.
    """

    att_shift: torch.Tensor  # [layers, B, hidden]
    wkv: torch.Tensor  # [layers, B, heads, head_dim (key), head_v_dim (value)], float32; fla's layout
    ffn_shift: torch.Tensor  # [layers, B, hidden]

    @classmethod
    def zeros(cls, config: Rwkv7Config, batch: int, dtype: torch.dtype, device) -> "Rwkv7State":
        layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_heads
        if len(set(config.value_dim)) != 1:
            raise ValueError("per-layer value_dim must be equal to stack the layers' states")
        head_v_dim = config.value_dim[0] // heads
        return cls(
            torch.zeros(layers, batch, hidden, dtype=dtype, device=device),
            torch.zeros(layers, batch, heads, config.head_dim, head_v_dim, device=device),
            torch.zeros(layers, batch, hidden, dtype=dtype, device=device),
        )

    def select(self, rows: torch.Tensor) -> "Rwkv7State":
        return Rwkv7State(self.att_shift[:, rows], self.wkv[:, rows], self.ffn_shift[:, rows])


class Rwkv7LoRA(nn.Module):
    """fla's LoRA: ``lora.2(activation(lora.0(x)))`` (module names kept for the checkpoint)."""

    def __init__(self, dim_in: int, dim_out: int, rank: int, activation, bias: bool = True):
        super().__init__()
        self.lora = nn.Sequential(nn.Linear(dim_in, rank, bias=False), activation, nn.Linear(rank, dim_out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


class Rwkv7Attention(nn.Module):
    """Time mix: token shift, LoRA decay / learning rate / value residual / gate, WKV7 per head."""

    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        hidden, value_dim = config.hidden_size, config.value_dim[layer_id]
        self.fuse_norm = config.fuse_norm
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        for name in ("r", "w", "k", "v", "a", "g"):
            setattr(self, f"x_{name}", nn.Parameter(torch.empty(1, 1, hidden)))
        self.k_k = nn.Parameter(torch.empty(hidden))
        self.k_a = nn.Parameter(torch.empty(hidden))
        self.r_k = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.r_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.w_lora = Rwkv7LoRA(hidden, hidden, config.decay_low_rank_dim, nn.Tanh())
        if layer_id != 0:
            self.v_lora = Rwkv7LoRA(hidden, value_dim, config.v_low_rank_dim, nn.Identity())
        self.a_lora = Rwkv7LoRA(hidden, hidden, config.a_low_rank_dim, nn.Identity())
        self.g_lora = Rwkv7LoRA(hidden, value_dim, config.gate_low_rank_dim, nn.Sigmoid(), bias=False)
        self.g_norm = nn.GroupNorm(self.num_heads, value_dim, eps=self.head_dim * config.norm_eps)

    def _removal_key(self, k: torch.Tensor) -> torch.Tensor:
        """kk: ``k * k_k`` scaled to unit norm per head, with fla's epsilon."""
        kk = (k * self.k_k).unflatten(-1, (self.num_heads, self.head_dim))
        if self.fuse_norm:
            return kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + _FUSED_L2_EPS)
        return F.normalize(kk, dim=-1)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None):
        """x: the normed input [B, T, hidden]; v_first: layer 0's v of the same tokens (None in layer 0).
        Returns the output, the new shift vector and WKV state, and v_first."""
        delta = _token_shift(x, shift) - x
        mixes = (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        xr, xw, xk, xv, xa, xg = (x + delta * mix for mix in mixes)
        r = self.r_proj(xr)
        log_decay = LOG_DECAY_FLOOR * torch.sigmoid(self.w_lora(xw))
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if v_first is None:
            v_first = v
        else:  # value residual: lean towards layer 0's value by a learned, token-dependent amount
            v = torch.lerp(v, v_first, torch.sigmoid(self.v_lora(xv)))
        iclr = torch.sigmoid(self.a_lora(xa))
        g = self.g_lora(xg)
        kk = self._removal_key(k)
        k = k * (1 + (iclr - 1) * self.k_a)  # the key written in, scaled by the learning rate via k_a

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, -1))

        r, k, v, iclr = map(heads, (r, k, v, iclr))
        # a = -kk, b = kk * iclr: what the state holds along kk is replaced at the learning rate iclr
        inputs = (r, heads(log_decay), k, v, -kk, kk * iclr)
        out, wkv = wkv7_recurrent_ref(*(t.transpose(1, 2) for t in inputs), wkv)  # it takes [B, H, T, D]
        batch, seq = x.shape[:2]
        out = self.g_norm(out.transpose(1, 2).to(x.dtype).reshape(batch * seq, -1)).view(batch, seq, -1)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # the current token's own r.k term
        out = self.o_proj((out + bonus.flatten(-2)) * g)
        return out, x[:, -1], wkv, v_first


class Rwkv7FeedForward(nn.Module):
    """Channel mix: token shift, squared-ReLU key, no receptance gate."""

    def __init__(self, config: Rwkv7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor):
        delta = _token_shift(x, shift) - x
        return self.value(torch.square(torch.relu(self.key(x + delta * self.x_k)))), x[:, -1]


class Rwkv7Block(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

        if config.norm_first and layer_id == 0:
            self.pre_norm = norm()
        self.attn_norm = norm()
        self.attn = Rwkv7Attention(config, layer_id)
        self.ffn_norm = norm()
        self.ffn = Rwkv7FeedForward(config)


class Rwkv7Model(nn.Module):
    def __init__(self, config: Rwkv7Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Rwkv7Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class Rwkv7ForCausalLM(nn.Module):
    """RWKV7 LM with explicit state and left-padding support.

    ``attention_mask`` (1 = token, 0 = left pad) zeroes each mix's input at pad positions, as fla
    does: a pad then writes nothing into the WKV state (k = v = kk = 0; from the zero initial state
    the decay keeps it zero) and the first real token's shifted input is zero, so a padded row ends
    in exactly the state of the same row run alone.
    """

    def __init__(self, config: Rwkv7Config):
        super().__init__()
        self.config = config
        self.model = Rwkv7Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def initial_state(self, batch: int) -> Rwkv7State:
        return Rwkv7State.zeros(self.config, batch, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        state: Rwkv7State | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Rwkv7State]:
        """Logits for every position [B, T, vocab] (float32) and the state after them."""
        hidden, state = self.backbone(input_ids, state, attention_mask)
        return self.lm_head(hidden).float(), state

    def backbone(
        self,
        input_ids: torch.Tensor,
        state: Rwkv7State | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Rwkv7State]:
        """Final-norm hidden states [B, T, hidden] and the state after them (vLLM applies the head)."""
        if state is None:
            state = self.initial_state(input_ids.shape[0])
        keep = None if attention_mask is None else attention_mask[..., None].to(self.dtype)
        hidden = self.model.embeddings(input_ids)
        att_shift, wkv, ffn_shift = [], [], []
        v_first = None
        for layer, block in enumerate(self.model.layers):
            if hasattr(block, "pre_norm"):
                hidden = block.pre_norm(hidden)
            x = block.attn_norm(hidden) if keep is None else block.attn_norm(hidden) * keep
            out, shift, layer_wkv, v_first = block.attn(x, state.att_shift[layer], state.wkv[layer], v_first)
            att_shift.append(shift)
            wkv.append(layer_wkv)
            hidden = hidden + out
            x = block.ffn_norm(hidden) if keep is None else block.ffn_norm(hidden) * keep
            out, shift = block.ffn(x, state.ffn_shift[layer])
            ffn_shift.append(shift)
            hidden = hidden + out
        return self.model.norm(hidden), Rwkv7State(torch.stack(att_shift), torch.stack(wkv), torch.stack(ffn_shift))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu") -> "Rwkv7ForCausalLM":
        """A model directory as fla's ``save_pretrained`` writes it (config.json, *.safetensors)."""
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path} has no .safetensors weights")
        weights = {k: v for file in files for k, v in load_file(os.path.join(path, file)).items()}
        with open(os.path.join(path, "config.json")) as f:
            values = json.load(f)
        first = "model.layers.0.attn"
        ranks = {"decay_low_rank_dim": "w_lora", "a_low_rank_dim": "a_lora", "gate_low_rank_dim": "g_lora"}
        for rank, lora in ranks.items():  # a config may leave a rank null (fla then derives it from the size)
            values[rank] = weights[f"{first}.{lora}.lora.0.weight"].shape[0]
        if values.get("num_hidden_layers", 1) > 1:  # layer 0 has no value residual LoRA
            values["v_low_rank_dim"] = weights["model.layers.1.attn.v_lora.lora.0.weight"].shape[0]
        config = Rwkv7Config.from_dict(values)
        if config.tie_word_embeddings and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.embeddings.weight"]
        model = cls(config)
        model.load_state_dict(weights, strict=True)
        return model.to(device=device, dtype=dtype).eval()
