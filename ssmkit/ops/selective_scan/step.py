"""Single-step (decode) form of the selective scan: advance a ``(batch, dim, N)`` state in place
by one or several tokens. Registered under the op name ``"selective_scan_step"``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register
from ssmkit.ops.selective_scan._common import prepare_dt


@register("selective_scan_step", "reference")
def selective_scan_step_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Same signature and result as :func:`ssmkit.ops.selective_scan_step` (no validation).

    ``x, dt, z``: ``(batch, T, dim)``; ``B, C``: ``(batch, T, G, N)`` (already normalised by the
    public function). Computes in the state's dtype (float32, or float64).
    """
    bsz, T, dim = x.shape
    G, N = B.shape[2], B.shape[3]
    Dg = dim // G
    cdt = state.dtype
    delta = prepare_dt(dt, dt_bias, dt_softplus, cdt)  # the same Δ as the full-sequence forms
    xc = x.to(cdt)
    Bc, Cc = B.to(cdt), C.to(cdt)
    A4 = A.to(cdt).view(G, Dg, N)
    s = state.view(bsz, G, Dg, N)
    dA = torch.exp(delta.view(bsz, T, G, Dg, 1) * A4)  # Ā = exp(ΔA)   (batch, T, G, Dg, N)
    dtx = (delta * xc).view(bsz, T, G, Dg, 1)
    ys = []
    for t in range(T):
        s.mul_(dA[:, t]).addcmul_(dtx[:, t], Bc[:, t].unsqueeze(2))  # h = Ā h + Δ x B
        ys.append(torch.matmul(s, Cc[:, t].unsqueeze(-1)).view(bsz, dim))  # C·h
    y = torch.stack(ys, 1) if T > 1 else ys[0].unsqueeze(1)
    if D is not None:
        y = y + xc * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
