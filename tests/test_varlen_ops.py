"""The fast recurrence paths a vLLM layer calls once per step, against the token-by-token references:
the chunked RWKV6 WKV and the chunked RG-LRU scan (torch), their varlen forms over a step's packed rows
(``RowLayout``) and their one-token decodes; fla's varlen kernels in Triton's CPU interpreter where they
run there, and natively on CUDA.

Run as a script (``TRITON_INTERPRET=1`` set before Triton loads), this file prints the interpreter's errors
as one JSON object: ``test_fla_varlen_kernels_in_triton_interpreter`` runs it in a subprocess."""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_oprm.ops.rglru import rglru_decode, rglru_scan_ref, rglru_scan_torch, rglru_varlen  # noqa: E402
from vllm_oprm.ops.varlen import RowLayout  # noqa: E402
from vllm_oprm.ops.wkv6 import wkv6_chunk_torch, wkv6_decode, wkv6_recurrent_ref, wkv6_varlen  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernels run on CUDA only")


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error over the reference's scale (outputs near 0 carry no relative meaning of their own)."""
    return float((fast.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def wkv6_inputs(g, lead, length, heads, key, value, strength, device="cpu"):
    """r, k, v, log_decay laid out [*lead, H, T, D]; log decays -exp(N(0, 1) + strength) (3: the strong
    -exp(3) scale, -4: nearly no decay)."""
    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device)

    r, k = rand(*lead, heads, length, key), rand(*lead, heads, length, key)
    v = rand(*lead, heads, length, value)
    log_decay = -torch.exp(rand(*lead, heads, length, key) + strength)
    return r, k, v, log_decay, rand(heads, key)


@pytest.mark.parametrize(
    "batch, heads, length, key, value, strength, chunk_size, sub_chunk",
    [
        (2, 3, 1, 8, 8, 0.0, 32, 8),  # one token
        (2, 2, 37, 16, 12, 0.0, 32, 8),  # T not a multiple of the chunk, K != V
        (1, 2, 150, 16, 16, 3.0, 32, 8),  # strong decays: exp(-20) per token
        (1, 2, 150, 16, 16, -4.0, 32, 4),  # weak decays: the state keeps everything
        (2, 1, 100, 8, 8, 0.0, 64, 16),
        (1, 1, 70, 8, 8, 1.0, 16, 16),  # one sub-chunk per chunk
    ],
)
def test_wkv6_chunk_equals_recurrent_reference(batch, heads, length, key, value, strength, chunk_size, sub_chunk):
    g = torch.Generator().manual_seed(length + heads)
    r, k, v, log_decay, bonus = wkv6_inputs(g, (batch,), length, heads, key, value, strength)
    state = torch.randn(batch, heads, key, value, generator=g)
    out, final = wkv6_chunk_torch(r, k, v, log_decay, bonus, state, chunk_size=chunk_size, sub_chunk=sub_chunk)
    ref_out, ref_final = wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-4
    assert relative_error(final, ref_final) < 1e-4


def test_wkv6_chunk_mixed_and_extreme_decays():
    """Per channel a decay that switches inside chunks between -exp(3), ~0, and -1000 (whose exp
    underflows), bf16 inputs: the chunked form must neither overflow nor lose the weak channels."""
    g = torch.Generator().manual_seed(5)
    r, k, v, log_decay, bonus = wkv6_inputs(g, (2,), 90, 2, 16, 16, 0.0)
    log_decay[..., ::7, :4] = -1000.0
    log_decay[..., 10:40, 4:8] = -torch.exp(torch.tensor(3.0))
    log_decay[..., :, 8:] = -1e-3
    r, k, v = (x.bfloat16() for x in (r, k, v))
    state = torch.randn(2, 2, 16, 16, generator=g)
    out, final = wkv6_chunk_torch(r, k, v, log_decay, bonus, state)
    ref_out, ref_final = wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref_out) < 1e-4
    assert relative_error(final, ref_final) < 1e-4


def test_wkv6_chunk_rejects_a_chunk_that_sub_chunks_do_not_tile():
    x = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="multiple"):
        wkv6_chunk_torch(x, x, x, x, torch.zeros(1, 2), torch.zeros(1, 1, 2, 2), chunk_size=24, sub_chunk=16)


def random_layout(g, rows, longest, device="cpu", equal=False):
    """Row lengths in [1, longest], one row of a single token; or all ``longest`` (an OPRM step's chunk rows)."""
    lengths = torch.randint(1, longest + 1, (rows,), generator=g)
    lengths[rows // 2] = 1
    if equal:
        lengths[:] = longest
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return RowLayout.build(bounds, device), bounds.tolist()


def row_slices(bounds):
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def wkv6_varlen_case(g, device="cpu", rows=5, longest=45, heads=2, key=16, value=8, equal=False):
    """Packed [N, H, D] inputs, per-row initial states (every other row zeros, as a fresh row), and the
    reference run one row at a time."""
    layout, bounds = random_layout(g, rows, longest, device, equal)
    r, k, v, log_decay, bonus = wkv6_inputs(g, (), bounds[-1], heads, key, value, 0.0, device)
    packed = [x.transpose(0, 1).contiguous() for x in (r, k, v, log_decay)]  # [N, H, D]
    initial = torch.randn(rows, heads, key, value, generator=g, device=device)
    initial[::2] = 0.0
    ref = [wkv6_recurrent_ref(*(x[:, part][None] for x in (r, k, v, log_decay)), bonus, initial[i : i + 1])
           for i, part in enumerate(row_slices(bounds))]
    ref_out = torch.cat([out[0].transpose(0, 1) for out, _ in ref])
    ref_final = torch.cat([final for _, final in ref])
    return (*packed, bonus, initial, layout), ref_out, ref_final


# equal rows of a whole sub-chunk multiple: no padding, so the padded rows are a strided view
@pytest.mark.parametrize("rows, longest, equal", [(5, 45, False), (4, 16, True), (3, 64, True)])
def test_wkv6_varlen_equals_reference_row_by_row(rows, longest, equal):
    g = torch.Generator().manual_seed(6)
    args, ref_out, ref_final = wkv6_varlen_case(g, rows=rows, longest=longest, equal=equal)
    out, final = wkv6_varlen(*args)
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    assert relative_error(out, ref_out) < 1e-4
    assert relative_error(final, ref_final) < 1e-4


def wkv6_decode_case(g, device="cpu", rows=6, heads=2, key=16, value=8):
    r, k, v, log_decay, bonus = wkv6_inputs(g, (rows,), 1, heads, key, value, 0.0, device)
    r, k, v, log_decay = (x[:, :, 0] for x in (r, k, v, log_decay))  # [rows, H, D]
    state = torch.randn(rows, heads, key, value, generator=g, device=device)
    ref_out, ref_final = wkv6_recurrent_ref(*(x[:, :, None] for x in (r, k, v, log_decay)), bonus, state)
    return (r, k, v, log_decay, bonus, state), ref_out[:, :, 0], ref_final


@pytest.mark.parametrize("batch, length, width, chunk_size", [(2, 1, 5, 64), (3, 200, 33, 64), (2, 129, 8, 16),
                                                               (1, 64, 4, 64), (2, 50, 6, 7)])
def test_rglru_scan_torch_equals_reference(batch, length, width, chunk_size):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, width, generator=g)
    a = torch.rand(batch, length, width, generator=g)
    a[:, ::13] = 0.0  # resets: the product of a's through them is exactly 0
    a[:, 5::17] = 1e-30
    h0 = torch.randn(batch, width, generator=g)
    y, h = rglru_scan_torch(x, a, h0, chunk_size=chunk_size)
    ref_y, ref_h = rglru_scan_ref(x, a, h0)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)


def test_rglru_scan_torch_keeps_x_dtype_and_fp32_state():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 150, 16, generator=g).bfloat16()
    a = torch.rand(2, 150, 16, generator=g)
    h0 = torch.randn(2, 16, generator=g)
    y, h = rglru_scan_torch(x, a, h0)
    ref_y, ref_h = rglru_scan_ref(x, a, h0)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y, ref_y, atol=0, rtol=1e-2)  # both round the same fp32 h to bf16
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)


def rglru_varlen_case(g, device="cpu", rows=5, longest=40, width=24):
    layout, bounds = random_layout(g, rows, longest, device)
    x = torch.randn(bounds[-1], width, generator=g, device=device)
    a = torch.rand(bounds[-1], width, generator=g, device=device)
    a[bounds[1]] = 0.0  # a reset at the start of row 1, as RecurrentGemma's first position
    initial = torch.randn(rows, width, generator=g, device=device)
    initial[1::2] = 0.0
    ref = [rglru_scan_ref(x[None, part], a[None, part], initial[i : i + 1])
           for i, part in enumerate(row_slices(bounds))]
    return (x, a, initial, layout), torch.cat([y[0] for y, _ in ref]), torch.cat([h for _, h in ref])


@pytest.mark.parametrize("case, fast", [(wkv6_decode_case, wkv6_decode),  # one reference step
                                        (rglru_varlen_case, rglru_varlen)],  # row by row
                         ids=["wkv6_decode", "rglru_varlen"])
def test_equals_reference(case, fast):
    args, ref_out, ref_state = case(torch.Generator().manual_seed(7))
    out, state = fast(*args)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


def test_rglru_decode_equals_one_reference_step():
    g = torch.Generator().manual_seed(10)
    x, a = torch.randn(4, 9, generator=g).bfloat16(), torch.rand(4, 9, generator=g)
    state = torch.randn(4, 9, generator=g)
    a[0] = 0.0
    y, h = rglru_decode(x, a, state)
    ref_y, ref_h = rglru_scan_ref(x[:, None], a[:, None], state)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y, ref_y[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)


def interpreted_errors() -> dict[str, float]:
    """fla's kernels behind ``rglru_varlen`` (varlen HGRN) and ``wkv6_decode`` (fused recurrent RWKV6), run
    by Triton's interpreter on CPU tensors. (fla 0.6.0's ``chunk_rwkv6`` does not run in the interpreter:
    its ``chunk_fwd_kernel_h`` calls ``.to`` on a loop index, a Python int there; it is checked on CUDA.)"""
    import triton.runtime.autotuner as autotuner

    from vllm_oprm.ops.rglru import _rglru_varlen_fla
    from vllm_oprm.ops.wkv6 import _wkv6_decode_fla

    prune = autotuner.Autotuner.prune_configs  # no device to time configs on: keep each kernel's first
    autotuner.Autotuner.prune_configs = lambda self, kwargs, *rest: prune(self, kwargs, *rest)[:1]
    g = torch.Generator().manual_seed(11)
    args, ref_y, ref_h = rglru_varlen_case(g, width=40)
    y, h = _rglru_varlen_fla(*args)
    decode_args, ref_out, ref_final = wkv6_decode_case(g)
    out, final = _wkv6_decode_fla(*decode_args)
    return {"hgrn_y": relative_error(y, ref_y), "hgrn_h": relative_error(h, ref_h),
            "rwkv6_decode_out": relative_error(out, ref_out), "rwkv6_decode_state": relative_error(final, ref_final)}


def test_fla_varlen_kernels_in_triton_interpreter():
    pytest.importorskip("triton")
    pytest.importorskip("fla")
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {"hgrn_y", "hgrn_h", "rwkv6_decode_out", "rwkv6_decode_state"}
    assert max(errors.values()) < 1e-5, errors


@needs_cuda
def test_wkv6_varlen_on_cuda_equals_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    args, ref_out, ref_final = wkv6_varlen_case(g, "cuda", rows=7, longest=300, heads=4, key=64, value=64)
    out, final = wkv6_varlen(*args)
    assert relative_error(out, ref_out) < 5e-3  # fla's matmuls may run in TF32
    assert relative_error(final, ref_final) < 5e-3


@needs_cuda
def test_wkv6_and_rglru_decode_on_cuda_replay_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(1)
    args, ref_out, ref_final = wkv6_decode_case(g, "cuda", rows=8, heads=4, key=64, value=64)
    x, a, state = (torch.rand(8, 256, generator=g, device="cuda") for _ in range(3))
    wkv6_decode(*args), rglru_decode(x, a, state)  # warm-up: fla autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out, final), (y, h) = wkv6_decode(*args), rglru_decode(x, a, state)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, ref_out) < 5e-3 and relative_error(final, ref_final) < 5e-3
    ref_y, ref_h = rglru_scan_ref(x[:, None], a[:, None], state)
    torch.testing.assert_close(y, ref_y[:, 0])
    torch.testing.assert_close(h, ref_h)


@needs_cuda
def test_rglru_varlen_on_cuda_equals_reference():
    g = torch.Generator(device="cuda").manual_seed(2)
    args, ref_y, ref_h = rglru_varlen_case(g, "cuda", rows=6, longest=500, width=300)
    y, h = rglru_varlen(*args)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    print(json.dumps(interpreted_errors()))
