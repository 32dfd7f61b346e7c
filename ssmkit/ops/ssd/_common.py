"""Pieces shared by every SSD form: Δ preprocessing, D / z epilogue, packed sequences, segment sums.

Each form (reference, quadratic, chunked) only implements the bare SSM map
``(x, Δ, A, B, C, h0) -> (y, h_T)``; :func:`make_form` wraps it into the full op signature so the
forms cannot drift apart in how they treat ``dt_bias``, ``dt_limit``, ``D``, ``z`` and
``cu_seqlens``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Δ = clamp(softplus(dt + dt_bias), *dt_limit) (Mamba-2, Sec. 7; the clamp after softplus)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums ``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for i >= j, ``-inf`` above.

    Summed directly (a masked cumulative sum per column) instead of as the difference of two
    prefix sums: long prefixes of large negative log-decays cancel catastrophically in float32,
    and ``exp`` is only ever taken of these non-positive sums (for A <= 0), never of a large
    positive number. ``a: (..., T) -> (..., T, T)``.
    """
    T = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, T)  # x[..., k, j] = a[..., k]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # k > j
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    incl = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~incl, -math.inf)


def pad_packed(
    cu_seqlens: torch.Tensor, *tensors: torch.Tensor | None
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Turn packed ``(1, total, ...)`` tensors into a zero-padded batch ``(num_seqs, max_len, ...)``.

    Zero padding on the right is a no-op for every recurrence in this package (Δ = 0 keeps the
    SSD state, β = 0 and g = 0 keep the delta-rule state), so each row's final state is its
    sequence's. Returns the padded tensors and the ``(num_seqs, max_len)`` validity mask used by
    :func:`unpad_packed`.
    """
    cu = cu_seqlens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    max_len = max(int(lens.max()), 1)
    dev = tensors[0].device
    pos = torch.arange(max_len, device=dev)
    valid = pos[None, :] < lens.to(dev)[:, None]
    idx = (cu[:-1].to(dev)[:, None] + pos[None, :]).clamp(max=max(int(cu[-1]) - 1, 0))
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        g = t[0][idx]  # (num_seqs, max_len, ...)
        m = valid.view(*valid.shape, *([1] * (g.dim() - 2)))
        out.append(torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)))
    return out, valid


def unpad_packed(y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_packed`: ``(num_seqs, max_len, ...) -> (1, total, ...)``."""
    return y[valid].unsqueeze(0)


def make_form(core: Core) -> Callable:
    """Wrap ``core(x, dt, A, B, C, chunk_size, h0) -> (y, h_T)`` into the full ``ssd`` signature."""

    @functools.wraps(core)
    def form(
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk_size: int = 64,
        D: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        dt_bias: torch.Tensor | None = None,
        dt_softplus: bool = False,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        initial_state: torch.Tensor | None = None,
        return_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ):
        cdt = compute_dtype(x, dt, A, B, C, initial_state)
        delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
        xs, Bs, Cs = x.to(cdt), B.to(cdt), C.to(cdt)
        h0 = None if initial_state is None else initial_state.to(cdt)
        valid = None
        if cu_seqlens is not None:
            (xs, delta, Bs, Cs), valid = pad_packed(cu_seqlens, xs, delta, Bs, Cs)
        y, h_T = core(xs, delta, A.to(cdt), Bs, Cs, chunk_size, h0)
        if valid is not None:
            y = unpad_packed(y, valid)
        if D is not None:
            Dc = D.to(cdt)
            y = torch.addcmul(y, x.to(cdt), Dc[:, None] if Dc.dim() == 1 else Dc)  # y + D x, one pass
        if z is not None:
            y = y * F.silu(z.to(cdt))
        y = y.to(x.dtype)
        return (y, h_T) if return_final_state else y

    return form
