"""RWKV6 (Finch) WKV recurrence: the step-by-step torch reference and the device dispatch.

On CUDA, ``wkv6`` runs flash-linear-attention's Triton kernels (the chunked
form for prompts, the fused recurrent one for single-token decodes); anywhere
else, or without fla, the reference. Both take and return the same layouts.
"""

from __future__ import annotations

import torch


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


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    bonus: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``wkv6_recurrent_ref``'s contract, on fla's kernels where the tensors are on CUDA."""
    if not r.is_cuda:
        return wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except ImportError:
        return wkv6_recurrent_ref(r, k, v, log_decay, bonus, state)
    kernel = fused_recurrent_rwkv6 if r.shape[2] == 1 else chunk_rwkv6
    out, final = kernel(
        *(x.float().transpose(1, 2) for x in (r, k, v, log_decay)),  # fla wants [B, T, H, K]; fp32 as the reference
        bonus.float(),
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return out.transpose(1, 2).float(), final.float()
