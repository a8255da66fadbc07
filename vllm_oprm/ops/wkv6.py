"""RWKV6 (Finch) WKV recurrence: the step-by-step torch reference, the chunked torch form, and the
varlen and decode entry points a vLLM layer calls once per step.

``wkv6_recurrent_ref`` is the oracle. ``wkv6_chunk_torch`` computes the same thing chunk by chunk (the
parallel form fla's ``chunk_rwkv6`` implements on GPU): attention inside each chunk from cumulative log
decays, and one state hand-off per chunk. ``wkv6_varlen`` runs all rows of a step's packed tokens at once
(fla's varlen ``chunk_rwkv6`` on CUDA, the chunked torch form on right-padded rows elsewhere);
``wkv6_decode`` is one recurrent step for rows of one token each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the layout is only read here (its attributes and pad/unpad)
    from vllm_oprm.ops.varlen import RowLayout


def wkv6_recurrent_ref(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    bonus: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time, in float32, exactly as the recurrence is written.

    r, k, log_decay: [B, H, T, K]; v: [B, H, T, V]; bonus (``time_faaaa``): [H, K];
    state: [B, H, K, V]. For each t:
    ``o_t = r_t (S + bonus * k_t^T v_t)``, then ``S = exp(log_decay_t) * S + k_t^T v_t``.
    Returns (o [B, H, T, V] float32, final state [B, H, K, V] float32).
    """
    r, k, v, log_decay = (x.float() for x in (r, k, v, log_decay))
    state = state.float().clone()
    bonus = bonus.float()[None, :, :, None]
    out = torch.empty(*v.shape, dtype=torch.float32, device=v.device)
    for t in range(r.shape[2]):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = (r[:, :, t, :, None] * (state + bonus * kv)).sum(dim=-2)
        state = state * log_decay[:, :, t, :, None].exp() + kv
    return out, state


# Exponents below this are taken as this: exp(-80) ~ 2e-35 is as good as 0 next to any fp32 sum of O(1)
# terms, and CPU exp is tens of times slower where its result underflows (below about -88).
_LOG_TINY = -80.0


_GROUP_ELEMENTS = 1 << 20  # per operand of the in-chunk work (4 MiB): bounds the temporaries, and keeps them near cache


def _decay(exponent: torch.Tensor) -> torch.Tensor:
    """exp of a log decay (<= 0), in place on ``exponent`` (a temporary)."""
    return exponent.clamp_(_LOG_TINY, 0.0).exp_()


def _intra_chunk_scores(r, k, before, through, sub_chunk):
    """Strictly causal scores inside every chunk: ``A[t, s] = sum_k r_tk k_sk exp(before_tk - through_sk)``, s < t.

    r, k, before, through: [..., chunk_size, K], chunk_size a multiple of ``sub_chunk``; returns
    [..., chunk_size, chunk_size]. ``through`` is the inclusive cumulative log decay inside the chunk,
    ``before`` the exclusive one: the decay a state built at token s has seen when token t reads it is
    ``before_t - through_s <= 0``. No factor is ever above one: the rows of each sub-chunk meet the earlier
    sub-chunks through the decay p at their own start (``r_t exp(before_t - p)`` against
    ``k_s exp(p - through_s)``, one matmul), and the sub-chunks meet themselves one lag at a time through the
    exact exponents.
    """
    *lead, size, dim = r.shape
    n, c = size // sub_chunk, sub_chunk
    scores = r.new_zeros(*lead, size, size)
    for lo in range(c, size, c):
        start = before[..., lo : lo + 1, :]
        rows = r[..., lo : lo + c, :] * _decay(before[..., lo : lo + c, :] - start)
        cols = k[..., :lo, :] * _decay(start - through[..., :lo, :])
        scores[..., lo : lo + c, :lo] = rows @ cols.transpose(-1, -2)

    def split(x: torch.Tensor) -> torch.Tensor:  # [..., n, c, K]
        return x.reshape(*lead, n, c, dim)

    r, k, before, through = (split(x) for x in (r, k, before, through))
    blocks = scores.view(*lead, n, c, n, c).diagonal(0, -4, -2)  # [..., c (t), c (s), n]
    for lag in range(1, c):
        exact = _decay(before[..., lag:, :] - through[..., : c - lag, :])
        blocks.diagonal(-lag, -3, -2).copy_((exact.mul_(r[..., lag:, :]).mul_(k[..., : c - lag, :])).sum(-1))
    return scores


def wkv6_chunk_torch(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    bonus: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 32,
    sub_chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``wkv6_recurrent_ref``'s contract and layouts, in the chunked parallel form, float32 throughout.

    T is cut into chunks of ``chunk_size`` (the tail padded with k = 0, log_decay = 0, which leave the state
    alone). Every chunk at once: the decayed causal scores A among its own tokens and what it writes to the
    state. Then chunk by chunk, from the state S the chunk starts with:
    ``o = A v + (r u k) v + (r * exp(before)) S`` (the bonus u on the diagonal) and
    ``S = exp(total) * S + (k * exp(total - through))^T v``. Every exponent is a log decay between two points
    of one chunk, never positive, so decays as strong as ``-exp(3)`` per token only underflow to 0.
    """
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of sub_chunk {sub_chunk}")
    batch, heads, length, _ = r.shape
    chunk_size = min(chunk_size, -(-length // sub_chunk) * sub_chunk)  # a short T takes one short chunk
    chunks = -(-length // chunk_size)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B, H, chunks, chunk_size, D] fp32, 0-padded
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, chunks * chunk_size - length))
        return x.contiguous().view(batch, heads, chunks, chunk_size, -1)  # contiguous: the work writes through views

    r, k, v, log_decay = (blocks(x) for x in (r, k, v, log_decay))
    out = torch.empty_like(v)
    reads = torch.empty_like(r)
    writes = torch.empty_like(k).transpose(-1, -2)
    kept = r.new_empty(batch, heads, chunks, 1, r.shape[-1]).transpose(-1, -2)
    bonus = bonus.float()[None, :, None, None, :].expand(batch, heads, chunks, 1, -1)

    def items(x: torch.Tensor) -> torch.Tensor:  # [B, H, chunks, ...] -> [B * H * chunks, ...]
        return x.flatten(0, 2)

    # everything inside the chunks, a cache-sized group of (row, head, chunk) at a time
    group = max(1, _GROUP_ELEMENTS // (chunk_size * r.shape[-1]))
    for lo in range(0, batch * heads * chunks, group):
        part = slice(lo, lo + group)
        rc, kc, vc, decay = (items(x)[part] for x in (r, k, v, log_decay))
        through = decay.cumsum(-2)
        before = torch.nn.functional.pad(through[..., :-1, :], (0, 0, 1, 0))  # through[t - 1], 0 first
        total = through[..., -1:, :]
        inside = _intra_chunk_scores(rc, kc, before, through, sub_chunk) @ vc
        items(out)[part] = inside.addcmul_((rc * items(bonus)[part] * kc).sum(-1, keepdim=True), vc)
        items(reads)[part] = rc * _decay(before)
        items(writes)[part] = (kc * _decay(total - through)).transpose(-1, -2)
        items(kept)[part] = _decay(total.clone()).transpose(-1, -2)
    carried = state.float()
    for c in range(chunks):
        out[:, :, c] += reads[:, :, c] @ carried
        carried = kept[:, :, c] * carried + writes[:, :, c] @ v[:, :, c]
    out = out.view(batch, heads, chunks * chunk_size, -1)
    return out[:, :, :length], carried


def _fla_rwkv6():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except ImportError:
        return None
    return chunk_rwkv6, fused_recurrent_rwkv6


def _wkv6_varlen_fla(r, k, v, log_decay, bonus, initial, layout: RowLayout):
    """``wkv6_varlen`` through fla's varlen ``chunk_rwkv6`` (fp32 in, as the reference)."""
    out, final = _fla_rwkv6()[0](
        *(x.float()[None] for x in (r, k, v, log_decay)),  # one "batch" of all the packed tokens
        bonus.float(),
        scale=1.0,
        initial_state=initial.float(),
        output_final_state=True,
        cu_seqlens=layout.cu_seqlens,
        cu_seqlens_cpu=layout.cu_seqlens_cpu,  # fla plans its chunks from it: no read-back of cu_seqlens
    )
    return out[0].float(), final.float()


def _wkv6_decode_fla(r, k, v, log_decay, bonus, state):
    """``wkv6_decode`` through fla's ``fused_recurrent_rwkv6``, each row a batch entry of one token."""
    out, final = _fla_rwkv6()[1](
        *(x.float()[:, None] for x in (r, k, v, log_decay)),
        bonus.float(),
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return out[:, 0].float(), final.float()


def wkv6_varlen(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    bonus: torch.Tensor,
    initial: torch.Tensor,
    layout: RowLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a step at once. r, k, log_decay: packed [N, H, K]; v: [N, H, V]; bonus: [H, K];
    initial: [rows, H, K, V] (zeros for a row that starts fresh). Returns (out [N, H, V] float32,
    final [rows, H, K, V] float32).

    CUDA with fla: its varlen ``chunk_rwkv6`` over ``layout.cu_seqlens`` (fla plans its chunks from the host
    copy ``layout.cu_seqlens_cpu``, so nothing is read back). Elsewhere: rows right-padded to ``layout.max_len`` (k = 0 and log_decay = 0 past a
    row's end keep its state), ``wkv6_chunk_torch``, and the padding dropped.
    """
    if r.is_cuda and _fla_rwkv6() is not None:
        return _wkv6_varlen_fla(r, k, v, log_decay, bonus, initial, layout)
    rows = (layout.pad(x.float()).transpose(1, 2) for x in (r, k, v, log_decay))  # [rows, H, max_len, D]
    out, final = wkv6_chunk_torch(*rows, bonus, initial)
    return layout.unpad(out.transpose(1, 2)), final


def wkv6_decode(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    bonus: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: r, k, log_decay [rows, H, K], v [rows, H, V], bonus [H, K], state [rows, H, K, V].
    Returns (out [rows, H, V] float32, new state [rows, H, K, V] float32). Static shapes and no reads back
    to the host, so a CUDA graph can hold it (fla's fused recurrent kernel on CUDA, torch elsewhere)."""
    if r.is_cuda and _fla_rwkv6() is not None:
        return _wkv6_decode_fla(r, k, v, log_decay, bonus, state)
    r, k, v, log_decay, state = (x.float() for x in (r, k, v, log_decay, state))
    out = torch.einsum("nhk,nhkv->nhv", r, state) + (r * bonus.float() * k).sum(-1, keepdim=True) * v
    return out, log_decay.exp()[..., None] * state + k[..., None] * v[..., None, :]

