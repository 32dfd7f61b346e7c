"""One decoding step of SSD, updating the state in place (no recompute of the prefix).

    h <- exp(Δ A) h + Δ x Bᵀ,     y = h C (+ D x) (* silu(z))

``state: (batch, H, P, N)`` (float32, or float64), ``x: (batch, H, P)``, ``dt: (batch, H)``,
``B, C: (batch, G, N)``. Heads are viewed as (G, H/G) so B and C broadcast without copies.
The Triton form of the op is :mod:`ssmkit.ops.ssd.step_triton`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register
from ssmkit.ops.ssd._common import process_dt


def ssd_step_one(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    b, h, p, n = state.shape
    g = B.shape[1]
    sdt = state.dtype
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, sdt)  # (b, h)
    decay = torch.exp(delta * A.to(sdt))
    st = state.view(b, g, h // g, p, n)
    xs = x.to(sdt)
    # two in-place passes over the state (decay, then the rank-1 write), no temporary of its size
    st.mul_(decay.view(b, g, h // g, 1, 1))
    st.addcmul_((xs * delta[..., None]).view(b, g, h // g, p, 1), B.to(sdt).view(b, g, 1, 1, n))
    y = (st @ C.to(sdt).view(b, g, 1, n, 1)).view(b, h, p)
    if D is not None:
        Dc = D.to(sdt)
        y = y + xs * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(sdt))
    return y.to(x.dtype)


@register("ssd_step", "reference")
def ssd_step_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                       dt_limit=(0.0, math.inf), state_batch_indices=None):
    """T tokens (no validation): ``x: (batch, T, H, P)``, ``dt: (batch, T, H)``, ``B, C: (batch, T,
    G, N)``, ``z`` like ``x``; one :func:`ssd_step_one` per token.

    ``state_batch_indices (batch,)``: row ``b`` advances pool row ``state_batch_indices[b]`` of
    ``state (pool, H, P, N)``; a negative index is a padding row (output zero, no state touched).
    """
    if state_batch_indices is not None:
        idx = state_batch_indices.long()
        keep = idx >= 0
        rows = idx[keep]
        sub = state[rows]  # a copy of the rows, written back below
        ys = ssd_step_reference(sub, x[keep], dt[keep], A, B[keep], C[keep], D, None if z is None else z[keep],
                                dt_bias, dt_softplus, dt_limit)
        state[rows] = sub
        y = x.new_zeros(x.shape)
        y[keep] = ys
        return y
    ys = [ssd_step_one(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, None if z is None else z[:, t],
                       dt_bias, dt_softplus, dt_limit) for t in range(x.shape[1])]
    return torch.stack(ys, 1)
