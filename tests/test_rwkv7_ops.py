"""The RWKV7 WKV recurrence (``vllm_oprm.ops.wkv7``): the token-by-token torch reference against fla's naive
one, the chunked torch form, its varlen form over a step's packed rows with states gathered from and
scattered back to a state pool by slot, and the one-token decode; fla's GPU kernels natively where CUDA is
present (the Triton-interpreter run of fla's fused recurrent kernel is in tests/test_ops.py)."""

import pytest
import torch

from vllm_oprm.ops.varlen import RowLayout
from vllm_oprm.ops.wkv7 import LOG_DECAY_FLOOR, wkv7_chunk_torch, wkv7_decode, wkv7_recurrent_ref, wkv7_varlen

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernels run on CUDA only")


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def wkv7_inputs(g, lead, heads, length, key, value, spread=1.0, device="cpu"):
    """r, log_decay, k, v, a, b laid out [*lead, H, T, D] as RWKV7 makes them: log decays
    ``LOG_DECAY_FLOOR * sigmoid(N(0, spread))`` (a large spread reaches the floor), a = -kk and
    b = kk * iclr with kk of unit norm per head and iclr in (0, 1)."""
    def rand(*shape):
        return torch.randn(*lead, heads, length, *shape, generator=g).to(device)

    r, k, v = rand(key), rand(key), rand(value)
    log_decay = LOG_DECAY_FLOOR * torch.sigmoid(rand(key) * spread)
    kk = torch.nn.functional.normalize(rand(key), dim=-1)
    iclr = torch.rand(*lead, heads, length, key, generator=g).to(device)
    return r, log_decay, k, v, -kk, kk * iclr


def test_reference_equals_flash_linear_attention_naive_dplr_recurrence():
    naive = pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive")
    g = torch.Generator().manual_seed(0)
    r, log_decay, k, v, a, b = wkv7_inputs(g, (2,), 3, 17, 8, 6)
    state = torch.randn(2, 3, 8, 6, generator=g)
    out, final = wkv7_recurrent_ref(r, log_decay, k, v, a, b, state)
    # fla's naive form scales q by K**-0.5 and names the vectors (alpha, beta, gk)
    ref_out, ref_final = naive.dplr_recurrence(r * 8**0.5, k, v, a, b, log_decay, initial_state=state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)


def test_reference_state_carries_across_calls():
    g = torch.Generator().manual_seed(1)
    inputs = wkv7_inputs(g, (1,), 2, 9, 4, 4)
    zero = torch.zeros(1, 2, 4, 4)
    whole, final = wkv7_recurrent_ref(*inputs, zero)
    first, mid = wkv7_recurrent_ref(*(x[:, :, :5] for x in inputs), zero)
    rest, final2 = wkv7_recurrent_ref(*(x[:, :, 5:] for x in inputs), mid)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole)
    torch.testing.assert_close(final2, final)


@pytest.mark.parametrize(
    "batch, heads, length, key, value, spread, chunk_size",
    [
        (2, 3, 1, 8, 8, 1.0, 32),  # one token
        (2, 2, 37, 16, 12, 1.0, 32),  # T not a multiple of the chunk, K != V
        (1, 2, 150, 16, 16, 20.0, 32),  # decays at the floor or at ~0, mixed
        (1, 2, 200, 16, 16, 1.0, 64),  # the longest chunk allowed
        (2, 1, 100, 8, 8, 1.0, 16),
        (1, 2, 64, 64, 64, 1.0, 32),  # RWKV7's head size, whole chunks only
    ],
)
def test_chunk_equals_recurrent_reference(batch, heads, length, key, value, spread, chunk_size):
    g = torch.Generator().manual_seed(length + heads)
    inputs = wkv7_inputs(g, (batch,), heads, length, key, value, spread)
    state = torch.randn(batch, heads, key, value, generator=g)
    out, final = wkv7_chunk_torch(*inputs, state, chunk_size=chunk_size)
    ref_out, ref_final = wkv7_recurrent_ref(*inputs, state)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(final, ref_final) < 1e-5


def test_chunk_at_the_decay_floor_over_a_whole_long_chunk():
    """Every token at the strongest decay: a 64-token chunk's decay factors reach exp(+-39)."""
    g = torch.Generator().manual_seed(3)
    r, _, k, v, a, b = wkv7_inputs(g, (1,), 2, 128, 16, 16)
    log_decay = torch.full_like(r, LOG_DECAY_FLOOR)
    state = torch.randn(1, 2, 16, 16, generator=g)
    out, final = wkv7_chunk_torch(r, log_decay, k, v, a, b, state, chunk_size=64)
    ref_out, ref_final = wkv7_recurrent_ref(r, log_decay, k, v, a, b, state)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(final, ref_final) < 1e-5


def test_chunk_rejects_chunks_whose_decay_factors_could_overflow():
    x = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="above 64"):
        wkv7_chunk_torch(x, x, x, x, x, x, torch.zeros(1, 1, 2, 2), chunk_size=128)


def varlen_case(g, lengths, heads=2, key=16, value=8, device="cpu"):
    """Packed [N, H, D] inputs of rows of ``lengths``, and the rows' own [1, H, T, D] slices."""
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)])
    inputs = wkv7_inputs(g, (), heads, int(bounds[-1]), key, value, device=device)
    packed = [x.transpose(0, 1).contiguous() for x in inputs]  # [N, H, D]
    rows = [[x[:, lo:hi][None] for x in inputs] for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return RowLayout.build(bounds, device), packed, rows


@pytest.mark.parametrize("lengths", [[45, 1, 30, 7], [16, 16, 16], [64, 64]])
def test_varlen_equals_reference_row_by_row_with_states_in_a_pool(lengths):
    """Rows in permuted pool slots, the odd ones continuing from their slot's state and the even ones starting
    fresh over a slot that holds NaN (a reused slot): gathered, run in one call, and stored back."""
    g = torch.Generator().manual_seed(sum(lengths))
    heads, key, value = 2, 16, 8
    layout, packed, rows = varlen_case(g, lengths, heads, key, value)
    pool = torch.randn(len(lengths) + 3, heads, key, value, generator=g)
    slots = torch.randperm(pool.shape[0], generator=g)[: len(lengths)]
    continues = torch.arange(len(lengths)) % 2 == 1
    pool[slots[~continues]] = float("nan")
    before = pool.clone()
    initial = torch.where(continues[:, None, None, None], pool[slots], 0.0)
    out, final = wkv7_varlen(*packed, initial, layout)
    pool[slots] = final
    assert out.shape == (sum(lengths), heads, value)
    ref_outs = []
    for row, slot, carried in zip(rows, slots.tolist(), continues.tolist()):
        start = before[slot : slot + 1] if carried else torch.zeros(1, heads, key, value)
        ref_out, ref_final = wkv7_recurrent_ref(*row, start)
        ref_outs.append(ref_out[0].transpose(0, 1))
        assert relative_error(pool[slot : slot + 1], ref_final) < 1e-5
    assert relative_error(out, torch.cat(ref_outs)) < 1e-5
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[slots] = False
    torch.testing.assert_close(pool[untouched], before[untouched], atol=0, rtol=0)


def decode_case(g, rows=6, heads=2, key=16, value=8, device="cpu"):
    inputs = [x[:, :, 0] for x in wkv7_inputs(g, (rows,), heads, 1, key, value, device=device)]  # [rows, H, D]
    state = torch.randn(rows, heads, key, value, generator=g).to(device)
    ref_out, ref_final = wkv7_recurrent_ref(*(x[:, :, None] for x in inputs), state)
    return (*inputs, state), ref_out[:, :, 0], ref_final


def test_decode_equals_one_reference_step():
    args, ref_out, ref_final = decode_case(torch.Generator().manual_seed(7))
    out, final = wkv7_decode(*args)
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_fla_varlen_chunk_kernel_equals_reference_on_cuda():
    pytest.importorskip("fla")
    g = torch.Generator().manual_seed(8)
    lengths = [130, 1, 64, 9]
    layout, packed, rows = varlen_case(g, lengths, heads=2, key=64, value=64, device="cuda")
    initial = torch.randn(len(lengths), 2, 64, 64, generator=g).cuda()
    out, final = wkv7_varlen(*packed, initial, layout)
    ref = [wkv7_recurrent_ref(*row, initial[i : i + 1]) for i, row in enumerate(rows)]
    assert relative_error(out, torch.cat([o[0].transpose(0, 1) for o, _ in ref])) < 1e-3  # tf32 matmuls
    assert relative_error(final, torch.cat([f for _, f in ref])) < 1e-3


@needs_cuda
def test_fla_fused_recurrent_decode_equals_reference_on_cuda():
    pytest.importorskip("fla")
    args, ref_out, ref_final = decode_case(torch.Generator().manual_seed(9), key=64, value=64, device="cuda")
    out, final = wkv7_decode(*args)
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(final, ref_final) < 1e-5
