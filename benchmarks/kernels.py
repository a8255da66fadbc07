"""Parity and speed of the CUDA fast paths against the torch references, at 7B-model shapes.

RWKV6 WKV (Finch-7B: 64 heads of 64) through flash-linear-attention's kernels, and the RG-LRU
scan (RecurrentGemma-9B: lru_width 4096) through our fused Triton kernel and fla's HGRN kernels. The
varlen entry points a vLLM layer calls once per step (``wkv6_varlen``, ``rglru_varlen``)
for a step of 16 packed rows of 2000 tokens, and the decodes (``wkv6_decode``, ``rglru_decode``) for 64
rows. References: the token-by-token torch recurrences, and for the prompts the chunked torch WKV too.
Needs CUDA, Triton and fla, not vLLM, so it runs on a bare GPU machine. Prints a table and writes
benchmarks/results/kernels.json.

    python -m benchmarks.kernels
"""

from __future__ import annotations

import json
import os

import torch

from benchmarks.entropy_overhead import timed

from vllm_oprm.ops.rglru import (
    gate_log,
    rglru_decode,
    rglru_scan_ref,
    rglru_scan_triton,
    rglru_varlen,
)
from vllm_oprm.ops.varlen import RowLayout
from vllm_oprm.ops.wkv6 import wkv6_chunk_torch, wkv6_decode, wkv6_recurrent_ref, wkv6_varlen

RESULTS = os.path.join(os.path.dirname(__file__), "results", "kernels.json")
HEADS, HEAD_SIZE, LRU_WIDTH = 64, 64, 4096
ROWS, ROW_LENGTH, DECODES = 16, 2000, 64


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.float() - ref.float()).abs().max() / ref.float().abs().max())


def wkv6_inputs(batch: int, length: int, g: torch.Generator):
    r, k, v = (torch.randn(batch, HEADS, length, HEAD_SIZE, generator=g, device="cuda") for _ in range(3))
    log_decay = -torch.exp(torch.randn(batch, HEADS, length, HEAD_SIZE, generator=g, device="cuda") - 2)
    bonus = torch.randn(HEADS, HEAD_SIZE, generator=g, device="cuda")
    state = torch.randn(batch, HEADS, HEAD_SIZE, HEAD_SIZE, generator=g, device="cuda")
    return r, k, v, log_decay, bonus, state


def rglru_inputs(batch: int, length: int, g: torch.Generator):
    x = torch.randn(batch, length, LRU_WIDTH, generator=g, device="cuda", dtype=torch.bfloat16)
    a = torch.rand(batch, length, LRU_WIDTH, generator=g, device="cuda")
    a[:, 0] = 0.0  # RecurrentGemma's reset at position 0
    return x, a, torch.randn(batch, LRU_WIDTH, generator=g, device="cuda")


def equal_rows(rows: int, length: int, device: str = "cuda") -> RowLayout:
    return RowLayout.build(torch.arange(rows + 1) * length, device)


def packed_wkv6(layout: RowLayout):
    """``wkv6_varlen`` from the batched [B, H, T, D] layout: rows of equal length pack by a reshape."""
    def run(r, k, v, log_decay, bonus, state):
        packed = (x.transpose(1, 2).flatten(0, 1) for x in (r, k, v, log_decay))  # [B * T, H, D]
        out, final = wkv6_varlen(*packed, bonus, state, layout)
        return out.view(r.shape[0], -1, *out.shape[1:]).transpose(1, 2), final
    return run


def packed_rglru(layout: RowLayout):
    def run(x, a, h0):
        y, h = rglru_varlen(x.flatten(0, 1), a.flatten(0, 1), h0, layout)
        return y.view(x.shape), h
    return run


def one_token(fn):
    """A decode entry point ([rows, ...] per token) on the batched layout with T = 1."""
    def wkv6_run(r, k, v, log_decay, bonus, state):
        out, final = fn(*(x[:, :, 0] for x in (r, k, v, log_decay)), bonus, state)
        return out[:, :, None], final
    return wkv6_run


def rglru_one_token(x, a, h0):
    y, h = rglru_decode(x[:, 0], a[:, 0], h0)
    return y[:, None], h


def fla_chunk_hgrn(x, a, h0):
    """fla's chunked HGRN on padded rows (it takes no cu_seqlens in fla 0.6.0)."""
    from fla.ops.hgrn import chunk_hgrn

    y, h = chunk_hgrn(x.float(), gate_log(a), initial_state=h0.float(), output_final_state=True)
    return y.to(x.dtype), h


def cases(g: torch.Generator):
    """(kernel, shape, inputs, fast, reference): every fast path against its torch reference."""
    rows, decode = wkv6_inputs(ROWS, ROW_LENGTH, g), wkv6_inputs(DECODES, 1, g)
    layout = equal_rows(ROWS, ROW_LENGTH)
    lru_rows, lru_decode = rglru_inputs(ROWS, ROW_LENGTH, g), rglru_inputs(DECODES, 1, g)
    step = f"varlen {ROWS} x {ROW_LENGTH}"
    return [
        ("wkv6_varlen", step, rows, packed_wkv6(layout), wkv6_recurrent_ref),
        ("wkv6_varlen", f"{step} vs chunk", rows, packed_wkv6(layout), wkv6_chunk_torch),
        ("wkv6_decode", f"decode {DECODES}", decode, one_token(wkv6_decode), wkv6_recurrent_ref),
        ("rglru_varlen", f"{step} fla", lru_rows, packed_rglru(equal_rows(ROWS, ROW_LENGTH)), rglru_scan_ref),
        ("rglru_triton", f"padded {ROWS} x {ROW_LENGTH}", lru_rows, rglru_scan_triton, rglru_scan_ref),
        ("rglru_fla_chunk", f"padded {ROWS} x {ROW_LENGTH}", lru_rows, fla_chunk_hgrn, rglru_scan_ref),
        ("rglru_decode", f"decode {DECODES}", lru_decode, rglru_one_token, rglru_scan_ref),
    ]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels needs a CUDA device: the fast paths are Triton kernels")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kernel, shape, inputs, fast, ref in cases(g):
        error = max(relative_error(f, r) for f, r in zip(fast(*inputs), ref(*inputs)))
        # each call waits for the GPU, so the time covers the kernels and not just their launch
        fast_s, ref_s = (timed(lambda fn=fn: (fn(*inputs), torch.cuda.synchronize()), 5) for fn in (fast, ref))
        rows.append({"kernel": kernel, "shape": shape, "reference": ref.__name__, "max_relative_error": error,
                     "fast_s": fast_s, "reference_s": ref_s, "speedup": ref_s / fast_s})
    print(f"{'kernel':16} {'shape':26} {'reference':20} {'rel. error':>10} {'fast ms':>9} {'ref ms':>9} {'speedup':>8}")
    for row in rows:
        print(f"{row['kernel']:16} {row['shape']:26} {row['reference']:20} {row['max_relative_error']:10.1e} "
              f"{row['fast_s'] * 1e3:9.3f} {row['reference_s'] * 1e3:9.3f} {row['speedup']:7.1f}x")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
