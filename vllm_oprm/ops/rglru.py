"""RG-LRU linear recurrence ``h_t = a_t * h_{t-1} + x_t`` (RecurrentGemma's scan).

``rglru_scan_ref`` is the step-by-step torch reference (it runs anywhere);
``rglru_scan_triton`` fuses the whole scan into one Triton kernel, one program
per (row, block of channels), keeping ``h`` in registers in fp32. ``rglru_scan``
takes the kernel on CUDA tensors and the reference everywhere else.
"""

from __future__ import annotations

import torch

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


def rglru_scan(x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel on CUDA, the reference elsewhere."""
    if x.is_cuda and triton is not None:
        return rglru_scan_triton(x, a, h0)
    return rglru_scan_ref(x, a, h0)
