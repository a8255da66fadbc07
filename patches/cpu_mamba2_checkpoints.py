"""Mamba2 prefix caching ("align" mode) on vLLM 0.32.0's CPU platform.

With ``enable_prefix_caching`` vLLM keeps the Mamba2 state at block boundaries.
Inside one prefill it exports the state at the prompt's last block boundary
(a "prefill checkpoint") from the scan's per-chunk states. On CPU that breaks
once a prompt spans more than one block: the CPU scan ignores
``return_intermediate_states`` and returns one state per sequence, and the code
that stores the checkpoint is a Triton kernel. This patch gives the scan the
per-chunk states (running the CPU kernel one SSD chunk at a time, chaining the
state in float32) and stores checkpoints with torch indexing. Calls without
intermediate states still go straight to the CPU kernel.
"""

from __future__ import annotations

import torch

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
_applied = False


def chunk_states_scan(cpu_scan):
    """Wrap vLLM's CPU SSD scan so ``return_intermediate_states`` returns a state per chunk.

    The per-chunk path calls the same C++ kernel the CPU scan calls, once per
    SSD chunk, on the chunk's tokens with the sequence's running float32 state
    (which the kernel updates in place); the inputs are prepared once, as the
    CPU scan prepares them, so a call costs little more than the kernel.
    """
    from vllm import _custom_ops as ops

    def scan(x, dt, A, B, C, chunk_size, out, *, D=None, z=None, dt_bias=None, initial_states=None,
             return_intermediate_states=False, seq_idx=None, cu_seqlens=None, cu_chunk_seqlens=None,
             last_chunk_indices=None, dt_softplus=False, dt_limit=(0.0, float("inf")), state_dtype=None, **kwargs):
        if not return_intermediate_states:
            return cpu_scan(x, dt, A, B, C, chunk_size, out, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                            seq_idx=seq_idx, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
                            last_chunk_indices=last_chunk_indices, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            state_dtype=state_dtype, **kwargs)
        dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float().unsqueeze(0)
        if dt_softplus:
            dt = torch.nn.functional.softplus(dt)
        if dt_limit[0] > 0.0 or dt_limit[1] < float("inf"):
            dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
        if D is not None:
            D = D.float()
            while D.dim() > 1 and D.stride(-1) == 0:
                D = D.squeeze(-1)
            D = D.contiguous()
        batch = cu_seqlens.numel() - 1
        running = torch.zeros(batch, *x.shape[1:], B.shape[-1], dtype=torch.float32, device=x.device)
        if initial_states is not None:
            running.copy_(initial_states.float())
        bounds, owners = cu_chunk_seqlens.tolist(), seq_idx.tolist()
        states = torch.empty(len(owners), *running.shape[1:], dtype=torch.float32, device=x.device)
        spans: dict[int, torch.Tensor] = {}  # chunk length -> its cu_seqlens, built once
        for chunk, (start, end, seq) in enumerate(zip(bounds[:-1], bounds[1:], owners)):
            span = spans.setdefault(end - start, torch.tensor([0, end - start], dtype=torch.int32))
            ops.mamba_chunk_scan_fwd_cpu(
                out[start:end], running[seq : seq + 1], x[start:end], dt[start:end], A, B[start:end], C[start:end],
                D, None if z is None else z[start:end], span,
            )
            states[chunk] = running[seq]
        return states.to(state_dtype if state_dtype is not None else x.dtype)

    return scan


def store_prefill_checkpoint_torch(checkpoint, chunk_idx, x, conv_state, chunk_states, ssm_state,
                                   query_start_loc, *, state_len: int) -> None:
    """Torch twin of vLLM's Triton ``store_prefill_checkpoint``.

    For each prefill row with a checkpoint (offset > 0): the conv window is the
    ``state_len`` pre-conv inputs ending at the checkpoint, and the SSM state is
    the scan's state at the end of chunk ``chunk_idx[row]``.
    """
    offsets = checkpoint.checkpoint_offsets.tolist()
    blocks = checkpoint.state_indices.tolist()
    starts = query_start_loc.tolist()
    for row, offset in enumerate(offsets):
        if offset <= 0:
            continue
        end = starts[row] + offset
        conv_state[blocks[row], :, :state_len] = x[:, end - state_len : end].to(conv_state.dtype)
        ssm_state[blocks[row]] = chunk_states[int(chunk_idx[row])].to(ssm_state.dtype)


def apply() -> None:
    """Patch the Mamba2 scan and checkpoint store as vLLM's modules see them (idempotent)."""
    global _applied
    check_target(
        "cpu_mamba2_checkpoints", TARGET_VLLM, "check whether the CPU SSD scan returns intermediate states before re-targeting"
    )
    if _applied:
        return
    from vllm.model_executor.layers.mamba import mamba_mixer2
    from vllm.model_executor.layers.mamba.ops import ssd_combined
    from vllm.model_executor.layers.mamba.ops.cpu import mamba_ssm

    if ssd_combined._mamba_chunk_scan_combined_fwd is not mamba_ssm._mamba_chunk_scan_combined_fwd_cpu:
        raise RuntimeError("vLLM's SSD scan is not the CPU one: this patch is for the CPU platform only")
    ssd_combined._mamba_chunk_scan_combined_fwd = chunk_states_scan(mamba_ssm._mamba_chunk_scan_combined_fwd_cpu)
    mamba_mixer2.store_prefill_checkpoint = store_prefill_checkpoint_torch
    _applied = True
