"""Reference selective scan: the sequential recurrence of Mamba (Gu & Dao 2023, Algorithm 2),
one time step at a time, in float32 (float64 for float64 input). The ground truth for every
other form; gradients come from autograd."""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.selective_scan._common import as_groups, compute_dtype, finish, prepare_dt, segments


@register("selective_scan", "reference")
def selective_scan_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                             initial_state=None, return_final_state=False, cu_seqlens=None):
    """Same signature and result as :func:`ssmkit.ops.selective_scan` (no validation here)."""
    cdt = compute_dtype(x)
    bsz, L, dim = x.shape
    delta = prepare_dt(dt, dt_bias, dt_softplus, cdt)
    xc, Ac = x.to(cdt), A.to(cdt)
    Bg, Cg = as_groups(B).to(cdt), as_groups(C).to(cdt)
    rep = dim // Bg.shape[2]
    # Channel d reads group d // (dim / G): repeat each group's B and C over its channels.
    Bd = Bg.repeat_interleave(rep, dim=2)  # (batch, seqlen, dim, N)
    Cd = Cg.repeat_interleave(rep, dim=2)
    N = A.shape[1]
    ys, finals = [], []
    for i, (a, b) in enumerate(segments(cu_seqlens, L)):
        if initial_state is None:
            h = xc.new_zeros(bsz, dim, N)
        elif cu_seqlens is not None:
            h = initial_state[i : i + 1].to(cdt)
        else:
            h = initial_state.to(cdt)
        for t in range(a, b):
            # ZOH for A: Ā = exp(ΔA); Euler for B: B̄ = ΔB  (eq. 4 with the simplification of Sec. 3.5)
            dA = torch.exp(delta[:, t, :, None] * Ac)
            h = dA * h + (delta[:, t] * xc[:, t])[:, :, None] * Bd[:, t]
            ys.append((h * Cd[:, t]).sum(-1))
        finals.append(h)
    y = torch.stack(ys, 1) if ys else xc.new_zeros(bsz, 0, dim)
    y = finish(y, xc, D, z, x.dtype)
    if return_final_state:
        return y, torch.cat(finals, 0)
    return y
