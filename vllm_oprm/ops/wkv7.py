"""RWKV7 (Goose) WKV recurrence, in fla's convention: the step-by-step torch reference, the chunked torch
form, and the varlen and decode entry points a vLLM layer calls once per step.

The state of a head is a ``[K, V]`` matrix S. For each token, with the log decay w, key k, value v, receptance
r and the two vectors a, b of the low-rank "removal" (RWKV7 passes a = -kk and b = kk * iclr, kk the unit
removal key, iclr the in-context learning rate):
``S = diag(exp(w)) S + b (a^T S) + k v^T``, then ``o = r^T S``: a diagonal-plus-low-rank transition (the
official RWKV7's ``S diag(w) + S a b^T + v k^T`` on the transposed state).

``wkv7_recurrent_ref`` is the oracle. ``wkv7_chunk_torch`` computes the same chunk by chunk (the parallel form
fla's ``chunk_rwkv7`` implements on GPU). ``wkv7_varlen`` runs all rows of a step's packed tokens at once
(fla's varlen ``chunk_rwkv7`` on CUDA, the chunked torch form on right-padded rows elsewhere); ``wkv7_decode``
is one recurrent step for rows of one token each (fla's ``fused_recurrent_rwkv7`` on CUDA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the layout is only read here (its attributes and pad/unpad)
    from vllm_oprm.ops.varlen import RowLayout

# RWKV7 bounds its log decay to [-exp(-0.5), 0): w = LOG_DECAY_FLOOR * sigmoid(...). fla's chunked kernel
# is told so (its ``lower_bound``), which lets it take its faster 64-token chunks.
LOG_DECAY_FLOOR = -0.6065306597126334

_GROUP_ELEMENTS = 1 << 20  # per operand of the in-chunk work (4 MiB): bounds the temporaries, keeps them near cache


def wkv7_recurrent_ref(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time, in float32, exactly as the recurrence is written.

    r, log_decay, k, a, b: [B, H, T, K]; v: [B, H, T, V]; state: [B, H, K, V]. For each t:
    ``S = exp(log_decay_t) * S + b_t^T (a_t S) + k_t^T v_t``, then ``o_t = r_t S``.
    Returns (o [B, H, T, V] float32, final state [B, H, K, V] float32).
    """
    r, log_decay, k, v, a, b = (x.float() for x in (r, log_decay, k, v, a, b))
    state = state.float().clone()
    out = torch.empty(*v.shape, dtype=torch.float32, device=v.device)
    for t in range(r.shape[2]):
        removed = (a[:, :, t, :, None] * state).sum(dim=-2, keepdim=True)  # a_t S: [B, H, 1, V]
        state = (
            log_decay[:, :, t, :, None].exp() * state
            + b[:, :, t, :, None] * removed
            + k[:, :, t, :, None] * v[:, :, t, None, :]
        )
        out[:, :, t] = (r[:, :, t, :, None] * state).sum(dim=-2)
    return out, state


def wkv7_chunk_torch(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``wkv7_recurrent_ref``'s contract and layouts, in the chunked parallel form, float32 throughout, for
    log decays in [LOG_DECAY_FLOOR, 0] (RWKV7's range).

    T is cut into chunks (the tail padded with zeros, which leave the state alone). Inside a chunk that starts
    from S0, with ``through``/``before`` the inclusive/exclusive cumulative log decays, each token's removal
    ``u_t = a_t S_{t-1}`` depends on S0 and on the earlier tokens' removals:
    ``(I - A_ab) u = (a exp(before)) S0 + A_ak v``, with the strictly causal decayed scores
    ``A_xy[t, s] = sum_k x_tk y_sk exp(before_tk - through_sk)``. One unit-triangular solve per chunk gives
    ``u = U + W S0``; then ``o = (A_rk v + A_rb U) + (r exp(through) + A_rb W) S0`` (A_r* inclusive, read
    after the update, with ``through_t`` in place of ``before_t``) and
    ``S = (diag(exp(total)) + B^T W) S0 + K^T v + B^T U`` (B, K: b, k decayed to the chunk's end). All of that
    runs for every chunk at once; only the state hand-off walks the chunks in order.

    The scores factor as ``(x exp(before)) (y exp(-through))^T``: with RWKV7's bounded decay a chunk of up
    to 64 tokens keeps both factors within exp(+-39), far inside float32, so this costs no accuracy.
    """
    if chunk_size > 64:
        raise ValueError(f"chunk_size {chunk_size} is above 64: its decay factors could leave float32's range")
    batch, heads, length, key = r.shape
    chunk_size = min(chunk_size, length)
    chunks = -(-length // chunk_size)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B * H * chunks, chunk_size, D] fp32, 0-padded
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, chunks * chunk_size - length))
        return x.reshape(batch * heads * chunks, chunk_size, -1)

    r, log_decay, k, v, a, b = (blocks(x) for x in (r, log_decay, k, v, a, b))
    items, value = r.shape[0], v.shape[-1]
    inside = torch.empty_like(v)  # what each token reads from its own chunk
    reads = torch.empty_like(r)  # how it reads the chunk's starting state
    transition = r.new_empty(items, key, key)
    written = r.new_empty(items, key, value)
    strict = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=r.device).tril(-1)
    causal = strict.repeat(2, 2)  # (a | r) x (b | k): a strictly before, r through its own token
    causal[chunk_size:].logical_or_(torch.eye(chunk_size, dtype=torch.bool, device=r.device).repeat(1, 2))
    group = max(1, _GROUP_ELEMENTS // (chunk_size * key))
    for lo in range(0, items, group):
        part = slice(lo, lo + group)
        rc, wc, kc, vc, ac, bc = (x[part] for x in (r, log_decay, k, v, a, b))
        through = wc.cumsum(-2)
        total = through[:, -1:]
        grow = torch.exp(-through)
        rows = torch.cat([ac * (through - wc).exp_(), rc * through.exp()], dim=1)  # [group, 2C, K]
        cols = torch.cat([bc * grow, kc * grow], dim=1)
        scores = (rows @ cols.transpose(-1, -2)).masked_fill_(~causal, 0.0)
        scores = scores.unflatten(1, (2, chunk_size)).unflatten(-1, (2, chunk_size))
        (a_b, a_k), (r_b, r_k) = scores[:, 0].unbind(2), scores[:, 1].unbind(2)
        rhs = torch.cat([rows[:, :chunk_size], a_k @ vc], dim=-1)
        solved = torch.linalg.solve_triangular(-a_b, rhs, upper=False, unitriangular=True)  # (I - A_ab)^-1 rhs
        from_state, from_chunk = solved.split([key, value], dim=-1)  # W, U
        torch.baddbmm(r_k @ vc, r_b, from_chunk, out=inside[part])
        torch.baddbmm(rows[:, chunk_size:], r_b, from_state, out=reads[part])
        to_end = torch.exp(total - through)
        b_end = (bc * to_end).transpose(-1, -2)
        torch.baddbmm((kc * to_end).transpose(-1, -2) @ vc, b_end, from_chunk, out=written[part])
        torch.bmm(b_end, from_state, out=transition[part])
        transition[part].diagonal(0, -2, -1).add_(total[:, 0].exp())

    def per_chunk(x: torch.Tensor) -> torch.Tensor:  # [items, ...] -> [B, H, chunks, ...]
        return x.view(batch, heads, chunks, *x.shape[1:])

    out, reads, transition, written = (per_chunk(x) for x in (inside, reads, transition, written))
    starts = r.new_empty(batch, heads, chunks, key, value)  # the state each chunk starts from
    carried = state.float()
    for c in range(chunks):
        starts[:, :, c] = carried
        carried = torch.baddbmm(
            written[:, :, c].flatten(0, 1), transition[:, :, c].flatten(0, 1), carried.flatten(0, 1)
        ).view(batch, heads, key, value)
    out = torch.baddbmm(out.flatten(0, 2), reads.flatten(0, 2), starts.flatten(0, 2))
    out = out.view(batch, heads, chunks * chunk_size, value)
    return out[:, :, :length], carried


def _fla_rwkv7():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        return None
    return chunk_rwkv7, fused_recurrent_rwkv7


def _wkv7_varlen_fla(r, log_decay, k, v, a, b, initial, layout: RowLayout):
    """``wkv7_varlen`` through fla's varlen ``chunk_rwkv7`` (fp32 in, as the reference), told the decay bound
    as fla's own RWKV7 layer tells it."""
    out, final = _fla_rwkv7()[0](
        *(x.float()[None] for x in (r, log_decay, k, v, a, b)),  # one "batch" of all the packed tokens
        scale=1.0,
        initial_state=initial.float(),
        output_final_state=True,
        cu_seqlens=layout.cu_seqlens,
        cu_seqlens_cpu=layout.cu_seqlens_cpu,  # fla plans its chunks from it: no read-back of cu_seqlens
        safe_gate=True,
        lower_bound=LOG_DECAY_FLOOR,
        chunk_size=64,
    )
    return out[0].float(), final.float()


def _wkv7_decode_fla(r, log_decay, k, v, a, b, state):
    """``wkv7_decode`` through fla's ``fused_recurrent_rwkv7``, each row a batch entry of one token."""
    out, final = _fla_rwkv7()[1](
        *(x.float()[:, None] for x in (r, log_decay, k, v, a, b)),
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return out[:, 0].float(), final.float()


def wkv7_varlen(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial: torch.Tensor,
    layout: RowLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a step at once. r, log_decay, k, a, b: packed [N, H, K]; v: [N, H, V]; initial:
    [rows, H, K, V] (zeros for a row that starts fresh). log_decay must lie in [LOG_DECAY_FLOOR, 0], as
    RWKV7's does (fla's kernel relies on it). Returns (out [N, H, V] float32, final [rows, H, K, V] float32).

    CUDA with fla: its varlen ``chunk_rwkv7`` over ``layout.cu_seqlens`` (planned from the host copy
    ``layout.cu_seqlens_cpu``, so nothing is read back). Elsewhere: rows right-padded to ``layout.max_len``
    (zeros past a row's end keep its state), ``wkv7_chunk_torch``, and the padding dropped.
    """
    if r.is_cuda and _fla_rwkv7() is not None:
        return _wkv7_varlen_fla(r, log_decay, k, v, a, b, initial, layout)
    rows = (layout.pad(x.float()).transpose(1, 2) for x in (r, log_decay, k, v, a, b))  # [rows, H, max_len, D]
    out, final = wkv7_chunk_torch(*rows, initial)
    return layout.unpad(out.transpose(1, 2)), final


def wkv7_decode(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: r, log_decay, k, a, b [rows, H, K], v [rows, H, V], state [rows, H, K, V].
    Returns (out [rows, H, V] float32, new state [rows, H, K, V] float32). Static shapes and no reads back
    to the host, so a CUDA graph can hold it (fla's fused recurrent kernel on CUDA, torch elsewhere)."""
    if r.is_cuda and _fla_rwkv7() is not None:
        return _wkv7_decode_fla(r, log_decay, k, v, a, b, state)
    r, log_decay, k, v, a, b, state = (x.float() for x in (r, log_decay, k, v, a, b, state))
    removed = torch.einsum("nhk,nhkv->nhv", a, state)
    state = log_decay.exp()[..., None] * state + b[..., None] * removed[..., None, :] + k[..., None] * v[..., None, :]
    return torch.einsum("nhk,nhkv->nhv", r, state), state
