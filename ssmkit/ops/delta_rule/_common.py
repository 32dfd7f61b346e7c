"""Shared by the delta-rule forms: q/k normalisation, scale, dtype and packed sequences.

Each form implements only ``core(q, k, v, beta, g, chunk_size, h0) -> (o, h_T)`` with as many
query/key heads as value heads (grouped value heads are expanded here);
:func:`make_form` adds the rest so the forms agree on everything but the algorithm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ssmkit.ops.ssd._common import compute_dtype, pad_packed, unpad_packed


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(||x||² + eps) over the last dimension (DeltaNet's q/k normalisation)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def prepare_qk(q: torch.Tensor, k: torch.Tensor, use_qk_l2norm: bool,
               scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional L2 normalisation of q and k, then q * scale: shared by every form and the step."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is not None and scale != 1.0:
        q = q * scale
    return q, k


def per_value_head(t: torch.Tensor, hv: int) -> torch.Tensor:
    """Query/key heads ``(..., H, K)`` -> one per value head ``(..., hv, K)`` (head j reads j // (hv / H))."""
    h = t.shape[-2]
    r = hv // h
    # (an expand and one copy: static shapes, no repeat count read on the host)
    return t if r == 1 else t.unsqueeze(-2).expand(*t.shape[:-1], r, t.shape[-1]).reshape(*t.shape[:-2], hv, t.shape[-1])


def make_form(core: Callable) -> Callable:
    @functools.wraps(core)
    def form(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        g: torch.Tensor | None = None,
        scale: float | None = None,
        use_qk_l2norm: bool = False,
        chunk_size: int = 64,
        initial_state: torch.Tensor | None = None,
        return_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ):
        cdt = compute_dtype(q, k, v, beta, g, initial_state)
        q, k, v, beta = q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt)
        g = None if g is None else g.to(cdt)
        q, k = prepare_qk(q, k, use_qk_l2norm, scale)
        q, k = per_value_head(q, v.shape[2]), per_value_head(k, v.shape[2])
        h0 = None if initial_state is None else initial_state.to(cdt)
        valid = None
        if cu_seqlens is not None:
            # zero padding: β = 0 writes nothing and g = 0 keeps the state (α = 1)
            (q, k, v, beta, g), valid = pad_packed(cu_seqlens, q, k, v, beta, g)
        o, h_T = core(q, k, v, beta, g, chunk_size, h0)
        if valid is not None:
            o = unpad_packed(o, valid)
        return (o, h_T) if return_final_state else o

    return form
