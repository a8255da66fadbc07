"""Mamba1 / FalconMamba on vLLM 0.32.0's CPU platform: a pure-torch scan and state step.

vLLM 0.32.0 on CPU cannot run ``MambaMixer`` (Mamba1): prefill calls
``_C.selective_scan_fwd``, which the CPU build lacks; the CPU state update does
not handle Mamba1's [states, dim, dstate] layout; batched decode feeds a
non-contiguous tensor to ``out_proj``. This patch replaces the two kernels as
``mamba_mixer`` sees them with step-by-step torch versions and makes the
``out_proj`` input contiguous. Prefix caching works in vLLM's "align" mode
(the one ``enable_prefix_caching`` turns on for Mamba1): the scheduler ends
prefill steps on block boundaries and copies states between block slots, so
the kernels see one state index per sequence as without it; the "all" mode's
per-block indices are refused by the scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import check_target

TARGET_VLLM = ("0.32.0", "0.33.0")
_applied = False


def _ssm_step(state, x, dt, A, B, C, D, z):
    """One token of the selective SSM for a batch of rows, all float32.

    state [n, dim, dstate]; x, dt, z [n, dim]; B, C [n, dstate]; A [dim, dstate].
    """
    state = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, None, :]
    y = (state * C[:, None, :]).sum(-1)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return state, y


def selective_scan_torch(
    u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    query_start_loc=None, cache_indices=None, has_initial_state=None, **_unused,
):
    """Varlen prefill: u, delta, z [dim, tokens]; B, C [groups=1, dstate, tokens].
    Reads and writes ``ssm_states[cache_indices[i]]`` for sequence i."""
    if query_start_loc is None or cache_indices is None or cache_indices.dim() != 1:
        raise NotImplementedError("the CPU Mamba1 scan handles varlen batches without prefix caching only")
    B = B.reshape(-1, B.shape[-1]) if B.dim() == 3 else B
    C = C.reshape(-1, C.shape[-1]) if C.dim() == 3 else C
    A, D, out = A.float(), None if D is None else D.float(), torch.empty_like(u)
    starts = query_start_loc.tolist()
    for seq, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        index = int(cache_indices[seq])
        state = ssm_states[index].float()[None]
        if has_initial_state is None or not bool(has_initial_state[seq]):
            state = torch.zeros_like(state)
        dt = delta[:, start:end].float().T
        if delta_bias is not None:
            dt = dt + delta_bias.float()
        if delta_softplus:
            dt = F.softplus(dt)
        x, b, c = u[:, start:end].float().T, B[:, start:end].float().T, C[:, start:end].float().T
        gate = None if z is None else z[:, start:end].float().T
        for t in range(end - start):
            state, y = _ssm_step(state, x[t : t + 1], dt[t : t + 1], A, b[t : t + 1], c[t : t + 1],
                                 D, None if gate is None else gate[t : t + 1])
            out[:, start + t] = y[0].to(out.dtype)
        ssm_states[index] = state[0].to(ssm_states.dtype)
    return out


def selective_state_update_torch(
    state, x, dt, A, B, C, D, dt_bias, z=None, dt_softplus=False,
    state_batch_indices=None, dst_state_batch_indices=None, out=None, **_unused,
):
    """Decode step: x, dt, z [batch, dim]; B, C [batch, dstate]; state [slots, dim, dstate]."""
    src = state_batch_indices.reshape(-1).long()
    dst = src if dst_state_batch_indices is None else dst_state_batch_indices.reshape(-1).long()
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    if dt_softplus:
        dt = F.softplus(dt)
    new_state, y = _ssm_step(
        state[src].float(), x.float(), dt, A.float(), B.reshape(x.shape[0], -1).float(),
        C.reshape(x.shape[0], -1).float(), None if D is None else D.float(), None if z is None else z.float(),
    )
    state[dst] = new_state.to(state.dtype)
    out.copy_(y.to(out.dtype))


def apply() -> None:
    """Patch ``vllm.model_executor.layers.mamba.mamba_mixer`` in this process (idempotent)."""
    global _applied
    check_target("cpu_mamba1", TARGET_VLLM, "check whether Mamba1 on CPU still needs it before re-targeting")
    if _applied:
        return
    from vllm.model_executor.layers.mamba import mamba_mixer

    mamba_mixer.selective_scan_fn = selective_scan_torch
    mamba_mixer.selective_state_update = selective_state_update_torch
    original_init = mamba_mixer.MambaMixer.__init__

    def init_with_contiguous_out_proj(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        project = self.out_proj.forward
        self.out_proj.forward = lambda hidden, *a, **k: project(hidden.contiguous(), *a, **k)

    mamba_mixer.MambaMixer.__init__ = init_with_contiguous_out_proj
    _applied = True
