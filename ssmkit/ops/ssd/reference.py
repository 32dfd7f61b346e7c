"""Reference SSD: the plain recurrence of Mamba-2 (Dao & Gu 2024, eq. 1-2 with scalar A per head).

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ        h: (batch, H, P, N)
    y_t = h_t C_t

One time step per Python iteration: slow and obviously correct; every faster form is tested
against it.
"""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.ssd._common import make_form


def heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """``(batch, seqlen, G, N) -> (batch, seqlen, H, N)``: head i uses group i // (H // G)."""
    g = t.shape[2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=2)


def _reference_core(x, dt, A, B, C, chunk_size, h0):
    b, l, h, p = x.shape
    n = B.shape[-1]
    Bh, Ch = heads_from_groups(B, h), heads_from_groups(C, h)
    state = x.new_zeros(b, h, p, n) if h0 is None else h0
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * decay[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


ssd_reference = register("ssd", "reference")(make_form(_reference_core))
