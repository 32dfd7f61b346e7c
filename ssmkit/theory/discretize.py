"""Discretisation of the continuous system x'(t) = A x(t) + B u(t) with step Δ.

For dense ``A (..., N, N)`` (``B (..., N)`` or ``(..., N, M)``) and diagonal ``A (..., N)``
(``B (..., N)``); ``dt`` is a number or a tensor broadcasting against the batch dims ``...``.
Each returns ``(Ā, B̄)`` with x_k = Ā x_{k-1} + B̄ u_k:

* zero-order hold (S4D eq. (5), Mamba eq. (4)): Ā = exp(ΔA),  B̄ = (ΔA)^{-1}(exp(ΔA) - I) ΔB.
  The dense form uses the block exponential exp([[ΔA, ΔB], [0, 0]]) = [[Ā, B̄], [0, I]], which
  also holds for singular A.
* bilinear / Tustin (S4 eq. (3)): Ā = (I - Δ/2 A)^{-1}(I + Δ/2 A),  B̄ = (I - Δ/2 A)^{-1} ΔB.
* forward Euler: Ā = I + ΔA,  B̄ = ΔB.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_tensor


def _prep(A: torch.Tensor, B: torch.Tensor, dt, diagonal: bool | None):
    check_tensor("A", A)
    check_tensor("B", B)
    if diagonal is None:
        diagonal = A.dim() == 1
    if not diagonal and (A.dim() < 2 or A.shape[-1] != A.shape[-2]):
        raise ValueError(f"A must be square (..., N, N) for a dense system, got shape {tuple(A.shape)}")
    real_dtype = A.real.dtype if A.is_complex() else A.dtype
    if not isinstance(dt, torch.Tensor):  # a Python number: keep A's precision (not float32)
        dt = torch.as_tensor(dt, dtype=real_dtype, device=A.device)
    if not (dt.is_floating_point() or dt.is_complex()):
        dt = dt.to(real_dtype)
    if bool((dt.real <= 0).any() if dt.is_complex() else (dt <= 0).any()):
        raise ValueError("dt must be positive")
    N = A.shape[-1]
    vec_B = B.dim() == A.dim() - (0 if diagonal else 1)
    if B.shape[-1 if (diagonal or vec_B) else -2] != N:
        raise ValueError(f"B's state dimension must be N={N}, got B of shape {tuple(B.shape)}")
    return A, B, dt, diagonal, vec_B


def zoh(A: torch.Tensor, B: torch.Tensor, dt, diagonal: bool | None = None):
    """Zero-order hold. ``diagonal=None``: a 1-D A is diagonal, otherwise dense."""
    A, B, dt, diagonal, vec_B = _prep(A, B, dt, diagonal)
    if diagonal:
        dA = dt[..., None] * A
        Abar = torch.exp(dA)
        # (exp(ΔA) - 1)/(ΔA) · ΔB = expm1(ΔA)/A · B, accurate for small ΔA
        return Abar, torch.expm1(dA) / A * B
    N = A.shape[-1]
    Bm = B[..., None] if vec_B else B
    M = Bm.shape[-1]
    dtm = dt[..., None, None]
    batch = torch.broadcast_shapes(A.shape[:-2], Bm.shape[:-2], dt.shape)
    top = torch.cat([(dtm * A).expand(*batch, N, N), (dtm * Bm).expand(*batch, N, M)], dim=-1)
    block = torch.cat([top, torch.zeros(*batch, M, N + M, dtype=top.dtype, device=top.device)], dim=-2)
    E = torch.linalg.matrix_exp(block)
    Abar, Bbar = E[..., :N, :N], E[..., :N, N:]
    return Abar, (Bbar[..., 0] if vec_B else Bbar)


def bilinear(A: torch.Tensor, B: torch.Tensor, dt, diagonal: bool | None = None):
    """Bilinear (Tustin) transform, as in S4."""
    A, B, dt, diagonal, vec_B = _prep(A, B, dt, diagonal)
    if diagonal:
        dA = dt[..., None] * A
        den = 1 - dA / 2
        return (1 + dA / 2) / den, dt[..., None] * B / den
    N = A.shape[-1]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    dtm = dt[..., None, None]
    left = eye - dtm / 2 * A
    Abar = torch.linalg.solve(left, eye + dtm / 2 * A)
    Bm = B[..., None] if vec_B else B
    Bbar = torch.linalg.solve(left, dtm * Bm)
    return Abar, (Bbar[..., 0] if vec_B else Bbar)


def euler(A: torch.Tensor, B: torch.Tensor, dt, diagonal: bool | None = None):
    """Forward Euler."""
    A, B, dt, diagonal, vec_B = _prep(A, B, dt, diagonal)
    if diagonal:
        return 1 + dt[..., None] * A, dt[..., None] * B
    N = A.shape[-1]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    dtm = dt[..., None, None]
    Bm = B[..., None] if vec_B else B
    Bbar = dtm * Bm
    return eye + dtm * A, (Bbar[..., 0] if vec_B else Bbar)


METHODS = {"zoh": zoh, "bilinear": bilinear, "euler": euler}
