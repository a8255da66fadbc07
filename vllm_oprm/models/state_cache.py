"""What both model classes share with vLLM: a recurrent-state layer, its metadata, its custom-op plumbing.

A layer that owns recurrent state (an RWKV6 block, a RecurrentGemma recurrent
block) is a ``RecurrentStateLayer``: vLLM's recurrent-state manager allocates its
states per request as for Mamba, and a metadata builder of our own runs on the
host before every forward, as vLLM's linear-attention and GDN builders do. It
hands each layer the step's rows split into decodes (one token each, first in
the batch) and prefill parts, their state slots, which rows continue from a
state, and the prefill rows' ``RowLayout``. Layers read and write the state pool
by index inside custom ops (``register_layer_op``), so torch.compile traces
the rest of the model and the ops stay opaque; decodes use only fixed-size
tensors (CUDA-graph capturable), prefills run every row in one varlen call.
In vLLM's align mode (prefix caching) a step's slot is the block its last token falls in, and vLLM copies
states between block slots (``whole_state_copies``): the layers still see one slot per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.linear_attn import LinearAttentionBackend
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor, split_decodes_and_prefills

from ..ops.varlen import RowLayout

# vLLM's block pool never hands out block 0 (its null block), so padding rows may use state slot 0
NULL_SLOT = 0


@dataclass
class RecurrentStateMetadata:
    num_decodes: int  # rows of one token, first in the batch
    num_prefills: int
    slots_d: torch.Tensor  # [num_decodes] state slots
    continues_d: torch.Tensor  # bool [num_decodes]: the row has a state to continue from
    slots_p: torch.Tensor  # [num_prefills]
    continues_p: torch.Tensor  # bool [num_prefills]
    layout_p: RowLayout | None  # the prefill rows' tokens, which follow the decodes' tokens

    @property
    def num_prefill_tokens(self) -> int:
        return 0 if self.layout_p is None else self.layout_p.num_tokens


class RecurrentStateMetadataBuilder(AttentionMetadataBuilder[RecurrentStateMetadata]):
    """Builds ``RecurrentStateMetadata`` once per step for every layer of the group; decode slots go
    to persistent buffers so a captured decode graph keeps reading the right ones."""

    reorder_batch_threshold: int = 1
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        rows = vllm_config.scheduler_config.max_num_seqs
        self._slots_d = torch.zeros(rows, dtype=torch.int64, device=device)
        self._continues_d = torch.zeros(rows, dtype=torch.bool, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        m = common_attn_metadata
        rows = m.num_reqs
        slots = mamba_get_block_table_tensor(
            m.block_table_tensor, m.seq_lens, self.kv_cache_spec, self.vllm_config.cache_config.mamba_cache_mode
        )[:rows, 0]
        # a CUDA-graph batch's padding rows (seq_len 0) may hold stale block ids: send them to the null slot too
        slots = torch.where((slots < 0) | (m.seq_lens[:rows] == 0), NULL_SLOT, slots)
        query_lens = m.query_start_loc[1 : rows + 1] - m.query_start_loc[:rows]
        continues = m.seq_lens[:rows] > query_lens
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(m, decode_threshold=1)
        self._slots_d[:num_decodes].copy_(slots[:num_decodes], non_blocking=True)
        self._continues_d[:num_decodes].copy_(continues[:num_decodes], non_blocking=True)
        layout = None
        if num_prefills:
            bounds = m.query_start_loc_cpu[num_decodes : rows + 1]
            layout = RowLayout.build(bounds - bounds[0], self.device)
        return RecurrentStateMetadata(
            num_decodes=num_decodes,
            num_prefills=num_prefills,
            slots_d=self._slots_d[:num_decodes],
            continues_d=self._continues_d[:num_decodes],
            slots_p=slots[num_decodes:],
            continues_p=continues[num_decodes:],
            layout_p=layout,
        )


class RecurrentStateBackend(LinearAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "OPRM_RECURRENT_STATE"

    @staticmethod
    def get_builder_cls() -> type[RecurrentStateMetadataBuilder]:
        return RecurrentStateMetadataBuilder


class RecurrentStateLayer(MambaBase):
    """Mixin for a module that owns per-request recurrent states (put fp32 states first: aligned views).
    After vLLM binds the cache, ``self.kv_cache[i][slot]`` is state ``i`` of the request in ``slot``."""

    def init_states(self, shapes, dtypes, vllm_config: VllmConfig, prefix: str) -> None:
        if vllm_config.cache_config.mamba_cache_mode not in ("none", "align"):
            raise ValueError(
                f"{vllm_config.model_config.architecture} in vllm-oprm caches states in vLLM's 'align' mode only "
                f"(it writes one state per step), not {vllm_config.cache_config.mamba_cache_mode!r}"
            )
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

    def get_attn_backend(self) -> type[RecurrentStateBackend]:
        return RecurrentStateBackend

    def step_metadata(self) -> RecurrentStateMetadata | None:
        """This step's rows, or None in vLLM's profiling and warm-up runs (no requests, no cache)."""
        metadata = get_forward_context().attn_metadata
        return None if metadata is None else metadata.get(self.prefix)

    def read_states(self, which: int, slots: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
        """State ``which`` of the rows in ``slots``, zeros where a row starts fresh: chosen with ``where``,
        not multiplied away, since a reused slot may hold non-finite leftovers."""
        state = self.kv_cache[which][slots]
        return torch.where(continues.view(-1, *[1] * (state.dim() - 1)), state, 0.0)

    def write_states(self, which: int, slots: torch.Tensor, new: torch.Tensor) -> None:
        cache = self.kv_cache[which]
        cache[slots] = new.to(cache.dtype)

    def token_shift(self, x: torch.Tensor, out: torch.Tensor, which: int) -> None:
        """``out[t] = x[t - 1]`` within each row, the row's carried token (state ``which``) at its start;
        stores each row's last token as its new carried token."""
        meta = self.step_metadata()
        if meta is None:
            out[1:] = x[:-1]
            out[:1] = 0
            return
        d, p = meta.num_decodes, meta.num_prefill_tokens
        if d:
            out[:d] = self.read_states(which, meta.slots_d, meta.continues_d).to(out.dtype)
            self.write_states(which, meta.slots_d, x[:d])
        if p:
            carried = self.read_states(which, meta.slots_p, meta.continues_p)
            out[d : d + p] = meta.layout_p.shift(x[d : d + p], carried)
            self.write_states(which, meta.slots_p, x[d : d + p][meta.layout_p.last])


def whole_state_copies(num_states: int) -> tuple:
    """vLLM's align-mode prefix cache keeps a request's states in one slot per block and copies them to the
    next block's slot when a step crosses a boundary; a ``RecurrentStateLayer``'s states are copied whole."""
    return (get_temporal_copy_spec,) * num_states


def layer_of(layer_name) -> RecurrentStateLayer:
    return get_forward_context().no_compile_layers[layer_name]


def register_layer_op(name: str, op: Callable[..., None]) -> Callable[..., None]:
    """Register ``op`` (writes its ``out`` argument, returns nothing) as ``torch.ops.vllm.<name>``: opaque to
    torch.compile, traced as a no-op that fills ``out``."""

    def fake(*args, **kwargs) -> None:
        return None

    direct_register_custom_op(op_name=name, op_func=op, mutates_args=["out"], fake_impl=fake)
    return getattr(torch.ops.vllm, name)


def token_shift_op(x: torch.Tensor, out: torch.Tensor, layer_name: str, which: int) -> None:
    layer_of(layer_name).token_shift(x, out, which)


token_shift = register_layer_op("oprm_token_shift", token_shift_op)
