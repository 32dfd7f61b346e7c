"""Quadratic ("attention") form of SSD: the state space duality made explicit.

The SSM maps x to y by one lower-triangular semiseparable matrix (Dao & Gu 2024, Sec. 3-4)::

    y = (L ∘ C Bᵀ) (Δ x),     L[i, j] = exp(Δ_{j+1} A + ... + Δ_i A) for i >= j, else 0

— masked linear attention with C as queries, B as keys and Δx as values, the mask L given by
segment sums of the log decays. O(L²) time and memory: used to test the other forms.
An initial state adds ``exp(ΔA cumulative) C h0``; the final state is the last row of the same
sums applied to B (Δx)ᵀ.
"""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.ssd._common import make_form, segsum
from ssmkit.ops.ssd.reference import heads_from_groups


def _quadratic_core(x, dt, A, B, C, chunk_size, h0):
    b, l, h, p = x.shape
    Bh, Ch = heads_from_groups(B, h), heads_from_groups(C, h)
    a = (dt * A).transpose(1, 2)  # (b, h, l) log decays
    seg = segsum(a)  # (b, h, l, l)
    L = torch.exp(seg)
    CB = torch.einsum("bihn,bjhn->bhij", Ch, Bh)
    xdt = x * dt[..., None]
    y = torch.einsum("bhij,bjhp->bihp", L * CB, xdt)
    # Final state: h_T = sum_j exp(a_{j+1} + ... + a_T) B_j (Δx_j)ᵀ (+ exp(a_1 + ... + a_T) h0).
    h_T = torch.einsum("bhj,bjhn,bjhp->bhpn", torch.exp(seg[..., -1, :]), Bh, xdt)
    if h0 is not None:
        a_cum = torch.cumsum(a, dim=-1)  # (b, h, l), sums from the start: non-positive
        y = y + torch.exp(a_cum).transpose(1, 2)[..., None] * torch.einsum("bihn,bhpn->bihp", Ch, h0)
        h_T = h_T + torch.exp(a_cum[..., -1])[..., None, None] * h0
    return y, h_T


ssd_quadratic = register("ssd", "quadratic")(make_form(_quadratic_core))
