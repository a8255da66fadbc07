"""Runs the GPU kernels in Triton's interpreter on CPU tensors and prints their largest error
against the torch references, one JSON object. Used by tests/test_ops.py in a subprocess:
``TRITON_INTERPRET`` must be set before Triton compiles anything."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402

from vllm_oprm.ops.rglru import rglru_scan_ref, rglru_scan_triton  # noqa: E402
from vllm_oprm.ops.wkv6 import wkv6_recurrent_ref  # noqa: E402
from vllm_oprm.ops.wkv7 import LOG_DECAY_FLOOR, wkv7_recurrent_ref  # noqa: E402

# The interpreter has no device to time configs on: keep each autotuned kernel's first config.
_prune = autotuner.Autotuner.prune_configs
autotuner.Autotuner.prune_configs = lambda self, kwargs, *rest: _prune(self, kwargs, *rest)[:1]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def rglru_errors(g: torch.Generator) -> dict[str, float]:
    x = torch.randn(3, 37, 200, generator=g)  # 200 channels: two blocks, the second one partial
    a = torch.rand(3, 37, 200, generator=g)
    h0 = torch.randn(3, 200, generator=g)
    y, h = rglru_scan_triton(x, a, h0)
    ref_y, ref_h = rglru_scan_ref(x, a, h0)
    return {"rglru_y": max_error(y, ref_y), "rglru_h": max_error(h, ref_h)}


def wkv6_errors(g: torch.Generator) -> dict[str, float]:
    from fla.ops.rwkv6 import fused_recurrent_rwkv6

    B, H, T, K = 2, 2, 23, 16
    r, k, v = (torch.randn(B, H, T, K, generator=g) for _ in range(3))
    log_decay = -torch.exp(torch.randn(B, H, T, K, generator=g))
    bonus, state = torch.randn(H, K, generator=g), torch.randn(B, H, K, K, generator=g)
    out, final = fused_recurrent_rwkv6(
        *(t.transpose(1, 2) for t in (r, k, v, log_decay)), bonus, scale=1.0, initial_state=state, output_final_state=True
    )
    ref_out, ref_final = wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    return {"wkv6_out": max_error(out.transpose(1, 2), ref_out), "wkv6_state": max_error(final, ref_final)}


def wkv7_errors(g: torch.Generator) -> dict[str, float]:
    """fla's fused recurrent RWKV7 (the decode kernel) over whole sequences, inputs as RWKV7 makes them."""
    from fla.ops.rwkv7 import fused_recurrent_rwkv7

    B, H, T, K, V = 2, 2, 19, 16, 8
    r, k = torch.randn(B, H, T, K, generator=g), torch.randn(B, H, T, K, generator=g)
    v = torch.randn(B, H, T, V, generator=g)
    log_decay = LOG_DECAY_FLOOR * torch.sigmoid(torch.randn(B, H, T, K, generator=g))
    kk = torch.nn.functional.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, H, T, K, generator=g)
    state = torch.randn(B, H, K, V, generator=g)
    inputs = (r, log_decay, k, v, a, b)
    out, final = fused_recurrent_rwkv7(
        *(t.transpose(1, 2).contiguous() for t in inputs), scale=1.0, initial_state=state, output_final_state=True
    )
    ref_out, ref_final = wkv7_recurrent_ref(*inputs, state)
    return {"wkv7_out": max_error(out.transpose(1, 2), ref_out), "wkv7_state": max_error(final, ref_final)}


if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    print(json.dumps({**rglru_errors(generator), **wkv6_errors(generator), **wkv7_errors(generator)}))
