"""Initialisations of diagonal SSMs (S4D, Gu et al. 2022) and of the step size Δ.

S4D (Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State Space
Models", 2022) keeps N/2 complex modes λ_n (their conjugates are implied, so the real system has
N states). The initialisations, for n = 0 .. N/2 - 1:

* ``"diag-lin"`` (S4D-Lin, eq. 8):  λ_n = -1/2 + iπn.
* ``"diag-inv"`` (S4D-Inv, eq. 9):  λ_n = -1/2 + i (N/π) (N/(2n+1) - 1).
* ``"diag-real"`` (S4D-Real):        λ_n = -(n+1).
* ``"legs"`` (S4D-LegS):             the diagonal Λ of the normal-plus-low-rank form of HiPPO-LegS
  (Sec. 4 of the S4D paper; see :func:`ssmkit.theory.hippo.nplr`), with B in that eigenbasis.

Δ is initialised log-uniformly in [dt_min, dt_max] (S4 Sec. 3 / Mamba Sec. 3.6) and stored as
a softplus preimage (Mamba) or a log (S4); :func:`inverse_softplus` gives the former.
"""

from __future__ import annotations

import math

import torch

from ssmkit._checks import check_positive_int

S4D_INITS = ("diag-lin", "diag-inv", "diag-real", "legs")


def inverse_softplus(x: torch.Tensor | float) -> torch.Tensor:
    """The y with softplus(y) = log(1 + e^y) = x, for x > 0: y = x + log(1 - e^{-x}).

    Written with ``expm1`` so it stays accurate for small x (Mamba stores dt_bias this way).
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    # Meta tensors (shape-only model construction, e.g. before loading a checkpoint) hold no values.
    if x.device.type != "meta" and bool((x <= 0).any()):
        raise ValueError("inverse_softplus needs x > 0")
    return x + torch.log(-torch.expm1(-x))


def log_uniform_dt(
    shape: int | tuple[int, ...],
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    *,
    floor: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Samples Δ = exp(U(log dt_min, log dt_max)), clamped below at ``floor``; shape ``shape``."""
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))):
        raise TypeError("dt_min and dt_max must be numbers")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=floor) if floor > 0 else dt


def s4d_init(kind: str, n_modes: int, dtype: torch.dtype = torch.complex128) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a diagonal SSM with ``n_modes`` complex modes (the real system has 2*n_modes states).

    Returns complex tensors of shape ``(n_modes,)``. B is all ones except for ``"legs"``, where it is
    HiPPO-LegS's B in the eigenbasis of its normal part (the kernel 2 Re sum_n C_n B_n ... over the
    kept half equals the full system's sum over all N modes).
    """
    check_positive_int("n_modes", n_modes)
    if kind not in S4D_INITS:
        raise ValueError(f"init must be one of {S4D_INITS}, got {kind!r}")
    n = torch.arange(n_modes, dtype=torch.float64)
    N = 2 * n_modes  # the state size of the real system
    ones = torch.ones(n_modes, dtype=torch.complex128)
    if kind == "diag-lin":
        A = torch.complex(-0.5 * torch.ones_like(n), math.pi * n)
        B = ones
    elif kind == "diag-inv":
        A = torch.complex(-0.5 * torch.ones_like(n), N / math.pi * (N / (2 * n + 1) - 1))
        B = ones
    elif kind == "diag-real":
        A = torch.complex(-(n + 1), torch.zeros_like(n))
        B = ones
    else:
        from ssmkit.theory.hippo import nplr

        Lam, _P, Bv, _V = nplr("legs", N)
        keep = conjugate_half(Lam)
        A, B = Lam[keep], Bv[keep]
    return A.to(dtype), B.to(dtype)


def conjugate_half(lam: torch.Tensor) -> torch.Tensor:
    """Indices of one member of each conjugate pair of ``lam`` (those with Im > 0, ascending),
    for a spectrum of an even-sized real matrix with no real eigenvalues."""
    idx = torch.argsort(lam.imag)
    n = lam.numel()
    if n % 2:
        raise ValueError(f"need an even number of eigenvalues, got {n}")
    return idx[n // 2 :]
