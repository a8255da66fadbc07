"""RWKV6 (Finch) causal LM in plain torch, reading the HF-format Finch checkpoints.

transformers has no RWKV6 class and flash-linear-attention's model needs Triton,
so this is the reference the OPRM backends are checked against. Module and
parameter names follow ``RWKV/v6-Finch-*-HF`` (``rwkv.blocks.N.attention.time_maa_x``,
``head.weight``, ...), so its safetensors load as they are published.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.wkv6 import wkv6_recurrent_ref

ARCHITECTURE = "Rwkv6ForCausalLM"


@dataclass
class Rwkv6Config:
    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 24
    attention_hidden_size: int | None = None
    head_size: int = 64
    head_size_divisor: int = 8
    intermediate_size: int | None = None
    layer_norm_epsilon: float = 1e-5
    rescale_every: int = 6
    bos_token_id: int = 0
    eos_token_id: int = 0
    tie_word_embeddings: bool = False
    time_mix_extra_dim: int = 32  # LoRA ranks; from_pretrained reads them from the weights
    time_decay_extra_dim: int = 64
    model_type: str = "rwkv6"
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])

    def __post_init__(self) -> None:
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = int((self.hidden_size * 3.5) // 32 * 32)

    @property
    def num_heads(self) -> int:
        return self.attention_hidden_size // self.head_size


    @classmethod
    def from_dict(cls, values: dict) -> "Rwkv6Config":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Rwkv6State:
    """Per-layer recurrent state: two token-shift buffers and the fp32 WKV matrix."""

    att_shift: torch.Tensor  # [layers, B, hidden]
    wkv: torch.Tensor  # [layers, B, heads, head_size, head_size], float32
    ffn_shift: torch.Tensor  # [layers, B, hidden]

    @classmethod
    def zeros(cls, config: Rwkv6Config, batch: int, dtype: torch.dtype, device) -> "Rwkv6State":
        layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_heads
        return cls(
            torch.zeros(layers, batch, hidden, dtype=dtype, device=device),
            torch.zeros(layers, batch, heads, config.head_size, config.head_size, device=device),
            torch.zeros(layers, batch, hidden, dtype=dtype, device=device),
        )

    def select(self, rows: torch.Tensor) -> "Rwkv6State":
        return Rwkv6State(self.att_shift[:, rows], self.wkv[:, rows], self.ffn_shift[:, rows])


def _token_shift(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """x[t-1] for every t, with the carried last token in front. x: [B, T, C]."""
    return torch.cat([last[:, None].to(x.dtype), x[:, :-1]], dim=1)


class Rwkv6SelfAttention(nn.Module):
    """Time mix: data-dependent token shift and decay, WKV state per head."""

    def __init__(self, config: Rwkv6Config):
        super().__init__()
        hidden, attn = config.hidden_size, config.attention_hidden_size
        self.num_heads, self.head_size = config.num_heads, config.head_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, hidden)))
        self.time_maa_w1 = nn.Parameter(torch.empty(hidden, config.time_mix_extra_dim * 5))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, config.time_mix_extra_dim, hidden))
        self.time_decay = nn.Parameter(torch.empty(1, 1, attn))
        self.time_decay_w1 = nn.Parameter(torch.empty(hidden, config.time_decay_extra_dim))
        self.time_decay_w2 = nn.Parameter(torch.empty(config.time_decay_extra_dim, attn))
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.receptance = nn.Linear(hidden, attn, bias=False)
        self.key = nn.Linear(hidden, attn, bias=False)
        self.value = nn.Linear(hidden, attn, bias=False)
        self.gate = nn.Linear(hidden, attn, bias=False)
        self.output = nn.Linear(attn, hidden, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, attn, eps=1e-5 * config.head_size_divisor**2)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor):
        batch, seq, _ = x.shape
        xx = _token_shift(x, shift) - x
        lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)
        lora = lora.view(batch * seq, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(lora, self.time_maa_w2).view(5, batch, seq, -1).unbind(0)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        g = F.silu(self.gate(x + xx * (self.time_maa_g + mg)))
        decay = self.time_decay + torch.tanh((x + xx * (self.time_maa_w + mw)) @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -torch.exp(decay.float())

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, self.head_size).transpose(1, 2)

        out, wkv = wkv6_recurrent_ref(heads(r), heads(k), heads(v), heads(log_decay), self.time_faaaa, wkv)
        out = out.transpose(1, 2).reshape(batch * seq, -1)
        out = F.group_norm(out, self.num_heads, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        out = self.output(out.view(batch, seq, -1).to(x.dtype) * g)
        return out, x[:, -1], wkv


class Rwkv6FeedForward(nn.Module):
    """Channel mix: token shift, squared-ReLU key, sigmoid receptance."""

    def __init__(self, config: Rwkv6Config):
        super().__init__()
        hidden = config.hidden_size
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, hidden))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, hidden))
        self.key = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(config.intermediate_size, hidden, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor):
        xx = _token_shift(x, shift) - x
        key = torch.square(torch.relu(self.key(x + xx * self.time_maa_k)))
        receptance = torch.sigmoid(self.receptance(x + xx * self.time_maa_r))
        return receptance * self.value(key), x[:, -1]


class Rwkv6Block(nn.Module):
    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = Rwkv6SelfAttention(config)
        self.feed_forward = Rwkv6FeedForward(config)


class Rwkv6Model(nn.Module):
    def __init__(self, config: Rwkv6Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Rwkv6Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size)


class Rwkv6ForCausalLM(nn.Module):
    """RWKV6 LM with explicit state and left-padding support.

    ``attention_mask`` (1 = token, 0 = left pad) zeroes each mix's input at pad
    positions: the shifted token seen by the first real token is then zero and
    pads write nothing into the WKV state (k = v = 0), so a padded row ends in
    exactly the state of the same row run alone.
    """

    def __init__(self, config: Rwkv6Config):
        super().__init__()
        self.config = config
        self.rwkv = Rwkv6Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.halve_every = 0  # set when fp16 weights were rescaled at load, as upstream does
        self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A random init with Finch-like ranges, so tiny test models are not flat."""
        norms = (nn.LayerNorm, nn.GroupNorm)
        for module in self.modules():
            for leaf, param in module.named_parameters(recurse=False):
                if isinstance(module, norms):
                    param.fill_(1.0) if leaf == "weight" else param.zero_()
                elif leaf in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
                    param.normal_(0.0, 0.1, generator=generator)
                elif leaf.startswith("time_maa_"):
                    param.uniform_(0.0, 1.0, generator=generator)
                elif leaf == "time_decay":
                    param.uniform_(-4.0, 0.0, generator=generator)
                elif leaf == "time_faaaa":
                    param.normal_(0.0, 0.5, generator=generator)
                else:  # embeddings and projections
                    param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)

    def initial_state(self, batch: int) -> Rwkv6State:
        return Rwkv6State.zeros(self.config, batch, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        state: Rwkv6State | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Rwkv6State]:
        """Logits for every position [B, T, vocab] (float32) and the state after them."""
        hidden, state = self.backbone(input_ids, state, attention_mask)
        return self.head(hidden).float(), state

    def backbone(
        self,
        input_ids: torch.Tensor,
        state: Rwkv6State | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Rwkv6State]:
        """Final-norm hidden states [B, T, hidden] and the state after them (vLLM applies the head)."""
        if state is None:
            state = self.initial_state(input_ids.shape[0])
        keep = None if attention_mask is None else attention_mask[..., None].to(self.dtype)
        hidden = self.rwkv.embeddings(input_ids)
        att_shift, wkv, ffn_shift = [], [], []
        for layer, block in enumerate(self.rwkv.blocks):
            if layer == 0:
                hidden = block.pre_ln(hidden)
            x = block.ln1(hidden) if keep is None else block.ln1(hidden) * keep
            out, shift, layer_wkv = block.attention(x, state.att_shift[layer], state.wkv[layer])
            att_shift.append(shift)
            wkv.append(layer_wkv)
            hidden = hidden + out
            x = block.ln2(hidden) if keep is None else block.ln2(hidden) * keep
            out, shift = block.feed_forward(x, state.ffn_shift[layer])
            ffn_shift.append(shift)
            hidden = hidden + out
            if self.halve_every and (layer + 1) % self.halve_every == 0:
                hidden = hidden / 2
        return self.rwkv.ln_out(hidden), Rwkv6State(torch.stack(att_shift), torch.stack(wkv), torch.stack(ffn_shift))

    # -- checkpoints ---------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(path, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu") -> "Rwkv6ForCausalLM":
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if files:
            weights = {k: v for file in files for k, v in load_file(file).items()}
        else:
            files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
            weights = {k: v for file in files for k, v in torch.load(file, map_location="cpu").items()}
        with open(os.path.join(path, "config.json")) as f:
            values = json.load(f)
        lora = "rwkv.blocks.0.attention.time_maa_w1", "rwkv.blocks.0.attention.time_decay_w1"
        if all(name in weights for name in lora):  # the LoRA ranks are in the weights, not in Finch configs
            values["time_mix_extra_dim"] = weights[lora[0]].shape[1] // 5
            values["time_decay_extra_dim"] = weights[lora[1]].shape[1]
        model = cls(Rwkv6Config.from_dict(values))
        model.load_checkpoint_weights(weights, source=path)
        model = model.to(device=device, dtype=dtype).eval()
        model.rescale_for_half_precision()
        return model

    @torch.no_grad()
    def load_checkpoint_weights(self, weights: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Copy HF-named Finch weights in, whatever shape they are stored in."""
        own = dict(self.named_parameters())
        if self.config.tie_word_embeddings and "head.weight" not in weights:
            weights = {**weights, "head.weight": weights["rwkv.embeddings.weight"]}
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} weights, e.g. {missing[:3]}")
        for name, param in own.items():
            param.copy_(weights[name].reshape(param.shape))  # time_decay is stored [1,1,A] or [H,K]

    @torch.no_grad()
    def rescale_for_half_precision(self) -> None:
        """Upstream's fp16 trick, for fp16/bf16 weights: shrink block outputs and halve
        the residual every ``rescale_every`` layers so activations stay in range."""
        if self.dtype not in (torch.float16, torch.bfloat16) or self.config.rescale_every <= 0:
            return
        every = self.config.rescale_every
        for layer, block in enumerate(self.rwkv.blocks):
            block.attention.output.weight.div_(2 ** (layer // every))
            block.feed_forward.value.weight.div_(2 ** (layer // every))
        self.halve_every = every
