"""Parity and speed of the CUDA fast paths against the torch references, at 7B-model shapes.

RWKV6 WKV (Finch-7B: 64 heads of 64) through flash-linear-attention's kernels, and the RG-LRU
scan (RecurrentGemma-9B: lru_width 4096) through the fused Triton kernel, each for a 2000-token
prompt (one OPRM chunk) and a batch of 64 one-token decodes. Needs CUDA, Triton and fla, not vLLM,
so it runs on a bare GPU machine. Prints a table and writes benchmarks/results/kernels.json.

    python -m benchmarks.kernels
"""

from __future__ import annotations

import json
import os

import torch

from benchmarks.entropy_overhead import timed

from vllm_oprm.ops.rglru import rglru_scan, rglru_scan_ref
from vllm_oprm.ops.wkv6 import wkv6, wkv6_recurrent_ref

RESULTS = os.path.join(os.path.dirname(__file__), "results", "kernels.json")


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.float() - ref.float()).abs().max() / ref.float().abs().max())


def wkv6_inputs(batch: int, length: int, g: torch.Generator):
    heads, size = 64, 64
    r, k, v = (torch.randn(batch, heads, length, size, generator=g, device="cuda") for _ in range(3))
    log_decay = -torch.exp(torch.randn(batch, heads, length, size, generator=g, device="cuda") - 2)
    bonus = torch.randn(heads, size, generator=g, device="cuda")
    state = torch.randn(batch, heads, size, size, generator=g, device="cuda")
    return r, k, v, log_decay, bonus, state


def rglru_inputs(batch: int, length: int, g: torch.Generator):
    width = 4096
    x = torch.randn(batch, length, width, generator=g, device="cuda", dtype=torch.bfloat16)
    a = torch.rand(batch, length, width, generator=g, device="cuda")
    return x, a, torch.randn(batch, width, generator=g, device="cuda")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels needs a CUDA device: the fast paths are Triton kernels")
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [
        ("wkv6", "prompt 1 x 2000", wkv6_inputs(1, 2000, g), wkv6, wkv6_recurrent_ref),
        ("wkv6", "decode 64 x 1", wkv6_inputs(64, 1, g), wkv6, wkv6_recurrent_ref),
        ("rglru", "prompt 1 x 2000", rglru_inputs(1, 2000, g), rglru_scan, rglru_scan_ref),
        ("rglru", "decode 64 x 1", rglru_inputs(64, 1, g), rglru_scan, rglru_scan_ref),
    ]
    rows = []
    for kernel, shape, inputs, fast, ref in cases:
        error = max(relative_error(f, r) for f, r in zip(fast(*inputs), ref(*inputs)))
        # each call waits for the GPU, so the time covers the kernels and not just their launch
        fast_s, ref_s = (timed(lambda fn=fn: (fn(*inputs), torch.cuda.synchronize()), 5) for fn in (fast, ref))
        rows.append({"kernel": kernel, "shape": shape, "max_relative_error": error, "fast_s": fast_s,
                     "reference_s": ref_s, "speedup": ref_s / fast_s})
    print(f"{'kernel':6} {'shape':16} {'rel. error':>10} {'fast ms':>9} {'ref ms':>9} {'speedup':>8}")
    for row in rows:
        print(f"{row['kernel']:6} {row['shape']:16} {row['max_relative_error']:10.1e} {row['fast_s'] * 1e3:9.3f} "
              f"{row['reference_s'] * 1e3:9.3f} {row['speedup']:7.1f}x")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
