"""HiPPO transition matrices (Gu, Dao, Ermon, Rudra & Ré, "HiPPO: Recurrent Memory with Optimal
Polynomial Projections", 2020) and their normal-plus-low-rank (NPLR) form (S4, Gu et al. 2022).

The continuous system x'(t) = A x(t) + B u(t) keeps x(t) = the coefficients of the projection of
u's history onto a polynomial basis. Conventions follow the S4 code (orthonormal bases, A with the
sign of a stable system); closed forms, for n, k = 0 .. N-1:

``"legs"`` (scaled Legendre, HiPPO eq. (2) / Appendix D.3; used as x' = A x / t + B u / t)::

    A_nk = -sqrt(2n+1) sqrt(2k+1)  if n > k,   -(n+1)  if n == k,   0  if n < k;   B_n = sqrt(2n+1)

``"legt"`` (translated Legendre, window of length 1, the LMU of Voelker et al. 2019 in an
orthonormal basis; the 1/2 factors follow the S4 code's time scale)::

    A_nk = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k));   B_n = 1/2 sqrt(2n+1)

``"lagt"`` (translated Laguerre, generalised Laguerre with α = 0, β = 1)::

    A_nk = -1  if n > k,   -1/2  if n == k,   0  if n < k;   B_n = 1

``"fourier"`` (FouT, truncated Fourier basis on a window of length 1; N even; index 0 is the
constant, 1 an unused zero-frequency sine, (2j, 2j+1) the cos/sin pair of frequency j >= 1)::

    A = S - b b^T,  S_{2j+1,2j} = 2πj = -S_{2j,2j+1} (rotations),  B = b = (1, 0, sqrt2, 0, sqrt2, 0, ...)

NPLR (S4, Theorem 1): every HiPPO A is A = S - P P^T with S normal. S = V diag(Λ) V^H with V
unitary, so A = V (diag(Λ) - (V^H P)(V^H P)^H) V^H: diagonal plus low rank (DPLR) in the basis V.
"""

from __future__ import annotations

import math

import torch

from ssmkit._checks import check_positive_int

MEASURES = ("legs", "legt", "lagt", "fourier")


def _check(measure: object, N: object) -> None:
    if not isinstance(measure, str) or measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    check_positive_int("N", N)
    if measure == "fourier" and N % 2:
        raise ValueError(f"N must be even for measure 'fourier', got N={N}")


def transition(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO state matrix ``A (N, N)`` and input matrix ``B (N,)``, float64."""
    _check(measure, N)
    q = torch.arange(N, dtype=torch.float64)
    n, k = q[:, None], q[None, :]  # row index n, column index k
    r = torch.sqrt(2 * q + 1)
    if measure == "legs":
        A = -torch.where(n > k, r[:, None] * r[None, :], torch.zeros(()))
        A = A - torch.diag(q + 1)
        B = r.clone()
    elif measure == "legt":
        sign = torch.where(n >= k, torch.ones(()), (-1.0) ** (n - k))
        A = -0.5 * r[:, None] * sign * r[None, :]
        B = 0.5 * r
    elif measure == "lagt":
        A = -torch.tril(torch.ones(N, N, dtype=torch.float64)) + 0.5 * torch.eye(N, dtype=torch.float64)
        B = torch.ones(N, dtype=torch.float64)
    else:  # fourier
        freqs = torch.arange(N // 2, dtype=torch.float64)
        # d = (0, 0, 0, 1, 0, 2, ...)[1:]: the subdiagonal couples cos_j (2j) to sin_j (2j+1)
        d = torch.stack([torch.zeros(N // 2, dtype=torch.float64), freqs], dim=-1).reshape(-1)[1:]
        A = 2 * math.pi * (torch.diag(d, -1) - torch.diag(d, 1))
        b = torch.zeros(N, dtype=torch.float64)
        b[0::2] = math.sqrt(2)
        b[0] = 1.0
        A = A - b[:, None] * b[None, :]
        B = b
    return A, B


def rank_correction(measure: str, N: int, rank: int = 1) -> torch.Tensor:
    """Low-rank ``P (rank, N)`` float64 with A + P^T P normal (S4, Theorem 1); extra rows are 0."""
    _check(measure, N)
    check_positive_int("rank", rank)
    q = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        P = torch.sqrt(q + 0.5)[None]
    elif measure == "legt":
        # A + P^T P is skew-symmetric plus a constant diagonal only with two rows (even/odd n).
        p = torch.sqrt(2 * q + 1) * math.sqrt(0.5)
        P0, P1 = p.clone(), p.clone()
        P0[0::2] = 0.0
        P1[1::2] = 0.0
        P = torch.stack([P0, P1])
    elif measure == "lagt":
        P = math.sqrt(0.5) * torch.ones(1, N, dtype=torch.float64)
    else:
        P = torch.zeros(N, dtype=torch.float64)
        P[0::2] = math.sqrt(2)
        P[0] = 1.0
        P = P[None]
    if rank < P.shape[0]:
        raise ValueError(f"measure {measure!r} needs rank >= {P.shape[0]}, got rank={rank}")
    if rank > P.shape[0]:
        P = torch.cat([P, torch.zeros(rank - P.shape[0], N, dtype=torch.float64)])
    return P


def nplr(
    measure: str, N: int, rank: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal-plus-low-rank form of HiPPO ``measure``.

    Returns ``(Lambda (N,), P (rank, N), B (N,), V (N, N))``, all complex128, with
    ``A == V @ (diag(Lambda) - P^T conj(P)) @ V^H`` (i.e. ``V (Λ - Σ_r p_r p_r^H) V^H``),
    ``B_original == V @ B``. Λ is sorted by imaginary part.
    """
    A, B = transition(measure, N)
    Pr = rank_correction(measure, N, rank)  # (rank, N) real
    S = A + Pr.T @ Pr  # normal: skew-symmetric plus a constant diagonal
    diag = torch.diagonal(S).mean()
    skew = S - diag * torch.eye(N, dtype=torch.float64)
    # A real skew-symmetric matrix K: -iK is Hermitian, so eigh gives K = V diag(iw) V^H exactly.
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    Lam = diag + 1j * w
    Vh = V.conj().T
    P = (Vh @ Pr.T.to(torch.complex128)).T  # (rank, N)
    Bv = Vh @ B.to(torch.complex128)
    return Lam, P, Bv, V


def dplr_reconstruct(Lam: torch.Tensor, P: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``V (diag(Λ) - Σ_r p_r p_r^H) V^H`` for the outputs of :func:`nplr` (the real A, as complex)."""
    inner = torch.diag(Lam) - P.T @ P.conj()
    return V @ inner @ V.conj().T
