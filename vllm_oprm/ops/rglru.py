"""RG-LRU linear recurrence ``h_t = a_t * h_{t-1} + x_t`` (RecurrentGemma's scan).

``rglru_scan_ref`` is the step-by-step torch reference (it runs anywhere); ``rglru_scan_torch`` the same in
chunks (the fast torch path); ``rglru_varlen`` runs all rows of a step's packed tokens at once (fla's varlen
HGRN kernel on CUDA, the chunked scan on right-padded rows elsewhere) and ``rglru_decode`` one token per row;
``rglru_scan_triton`` fuses the whole scan into one Triton kernel, one program
per (row, block of channels), keeping ``h`` in registers in fp32: kept only to be
measured against fla's HGRN kernels (``benchmarks/kernels.py``), which the layers use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the layout is only read here (its attributes and pad/unpad)
    from vllm_oprm.ops.varlen import RowLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton: the reference serves them
    triton = None


def rglru_scan_ref(x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, a: [B, T, D]; h0: [B, D]. Accumulates in fp32; returns (y [B, T, D] in x's dtype, h_T fp32)."""
    h = h0.float()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides
    for t in range(x.shape[1]):
        h = a[:, t].float() * h + x[:, t].float()
        y[:, t] = h.to(x.dtype)
    return y, h



def rglru_scan_torch(
    x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rglru_scan_ref``'s contract, chunked: a scan inside every chunk at once (from h = 0), the carry
    passed from chunk to chunk, then ``h_t = local_t + (a_1 ... a_t) h_start`` with the products of a taken
    by ``cumprod`` (never divided, so a may be tiny or 0): chunk_size + T / chunk_size steps instead of T.
    The tail that does not fill a chunk runs step by step from the carry."""
    batch, length, width = x.shape
    chunks = length // chunk_size
    body = chunks * chunk_size
    y = torch.empty(batch, length, width, dtype=torch.float32, device=x.device)
    h = h0.float()
    if chunks:
        xs = x[:, :body].view(batch, chunks, chunk_size, width)
        gates = a[:, :body].float().view(batch, chunks, chunk_size, width)
        local = y[:, :body].view(batch, chunks, chunk_size, width)
        local[:, :, 0] = xs[:, :, 0]
        for t in range(1, chunk_size):
            torch.addcmul(xs[:, :, t].float(), gates[:, :, t], local[:, :, t - 1], out=local[:, :, t])
        decay = gates.cumprod(2)
        starts = torch.empty(batch, chunks, 1, width, dtype=torch.float32, device=x.device)
        for c in range(chunks):
            starts[:, c, 0] = h
            h = torch.addcmul(local[:, c, -1], decay[:, c, -1], h)
        local.addcmul_(decay, starts)
    for t in range(body, length):
        h = torch.addcmul(x[:, t].float(), a[:, t].float(), h)
        y[:, t] = h
    return y.to(x.dtype), h

if triton is not None:

    @triton.jit
    def _rglru_scan_kernel(x_ptr, a_ptr, h0_ptr, y_ptr, h_out_ptr, T, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        valid = channels < D
        h = tl.load(h0_ptr + row * D + channels, mask=valid, other=0.0).to(tl.float32)
        for t in range(T):
            offset = (row * T + t) * D + channels
            a = tl.load(a_ptr + offset, mask=valid, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offset, mask=valid, other=0.0).to(tl.float32)
            h = a * h + x
            tl.store(y_ptr + offset, h.to(y_ptr.dtype.element_ty), mask=valid)
        tl.store(h_out_ptr + row * D + channels, h, mask=valid)


def rglru_scan_triton(x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor, block_d: int = 128):
    """The fused kernel; same contract as ``rglru_scan_ref``."""
    if triton is None:
        raise RuntimeError("rglru_scan_triton needs Triton")
    x, a, h0 = x.contiguous(), a.contiguous(), h0.float().contiguous()
    batch, length, width = x.shape
    y = torch.empty_like(x)
    h_out = torch.empty_like(h0)
    grid = (batch, triton.cdiv(width, block_d))
    _rglru_scan_kernel[grid](x, a, h0, y, h_out, length, width, BLOCK_D=block_d)
    return y, h_out


# log(a) for fla's gates g (h = exp(g) h + x): RecurrentGemma's a is 0 at a reset, whose log is -inf; any
# g below about -104 already gives exp(g) == 0 in fp32, so the gate is clamped here, finite for every kernel.
_LOG_ZERO = -200.0


def rglru_varlen(
    x: torch.Tensor, a: torch.Tensor, initial: torch.Tensor, layout: RowLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a step at once: x, a packed [N, D]; initial [rows, D] (zeros for a fresh row).
    Returns (y [N, D] in x's dtype, final [rows, D] fp32).

    CUDA with fla: its varlen ``fused_recurrent_hgrn`` (``h = exp(g) h + x``, g = log a clamped at
    ``_LOG_ZERO``) over ``layout.cu_seqlens``, on fp32 inputs so that its final state (returned in x's dtype)
    is fp32. Elsewhere: rows right-padded with a = 1, x = 0 (the state passes unchanged), ``rglru_scan_torch``,
    the padding dropped."""
    if x.is_cuda and _fla_hgrn() is not None:
        return _rglru_varlen_fla(x, a, initial, layout)
    y, final = rglru_scan_torch(layout.pad(x), layout.pad(a, 1.0), initial)
    return layout.unpad(y), final


def rglru_decode(x: torch.Tensor, a: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: x, a [rows, D], state [rows, D]; returns (y [rows, D] in x's dtype, new state
    fp32). Elementwise torch on every device: static shapes, no host reads, CUDA-graph capturable."""
    h = a.float() * state.float() + x.float()
    return h.to(x.dtype), h


def gate_log(a: torch.Tensor) -> torch.Tensor:
    """fla's HGRN gate for the multiplier a: log a in fp32, finite (a = 0 gives ``_LOG_ZERO``)."""
    return a.float().log().clamp_min(_LOG_ZERO)


def _fla_hgrn():
    try:
        from fla.ops.hgrn import fused_recurrent_hgrn
    except ImportError:
        return None
    return fused_recurrent_hgrn


def _rglru_varlen_fla(x, a, initial, layout: RowLayout):
    """``rglru_varlen`` through fla's varlen ``fused_recurrent_hgrn``."""
    y, final = _fla_hgrn()(
        x.float()[None],  # fp32 in, so that the final state it returns (in x's dtype) is fp32
        gate_log(a)[None],
        initial_state=initial.float(),
        output_final_state=True,
        cu_seqlens=layout.cu_seqlens,
    )
    return y[0].to(x.dtype), final
