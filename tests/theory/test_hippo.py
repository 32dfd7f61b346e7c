"""HiPPO matrices: closed forms, NPLR reconstruction, and LegS memory."""

import math

import pytest
import torch

from ssmkit.theory import hippo


def _closed_form(measure: str, N: int):
    """Element by element, as written in the HiPPO paper (S4-code normalisation)."""
    A = torch.zeros(N, N, dtype=torch.float64)
    B = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        for k in range(N):
            if measure == "legs":
                A[n, k] = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0.0)
            elif measure == "legt":
                A[n, k] = -0.5 * math.sqrt((2 * n + 1) * (2 * k + 1)) * (1 if n >= k else (-1) ** (n - k))
            elif measure == "lagt":
                A[n, k] = -1.0 if n > k else (-0.5 if n == k else 0.0)
        B[n] = {"legs": math.sqrt(2 * n + 1), "legt": 0.5 * math.sqrt(2 * n + 1), "lagt": 1.0}[measure]
    return A, B


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt"])
def test_transition_closed_form(measure):
    A, B = hippo.transition(measure, 12)
    A_ref, B_ref = _closed_form(measure, 12)
    assert A.dtype == torch.float64 and B.shape == (12,)
    torch.testing.assert_close(A, A_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(B, B_ref, rtol=0, atol=1e-12)


def test_fourier_is_rotation_minus_rank_one():
    N = 8
    A, B = hippo.transition("fourier", N)
    b = torch.tensor([1, 0, 2**0.5, 0, 2**0.5, 0, 2**0.5, 0], dtype=torch.float64)
    torch.testing.assert_close(B, b)
    S = A + b[:, None] * b[None, :]
    torch.testing.assert_close(S, -S.T)  # skew-symmetric: pure rotations
    for j in range(1, N // 2):  # frequency j rotates the (cos, sin) pair (2j, 2j+1) at rate 2πj
        assert S[2 * j + 1, 2 * j].item() == pytest.approx(2 * math.pi * j)
    assert S[:2].abs().max() == 0 and S[:, :2].abs().max() == 0


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("N", [8, 64, 256])
def test_nplr_reconstructs_A(measure, N):
    rank = 2 if measure == "legt" else 1
    Lam, P, Bv, V = hippo.nplr(measure, N, rank=rank)
    A, B = hippo.transition(measure, N)
    assert Lam.shape == (N,) and P.shape == (rank, N) and V.shape == (N, N)
    R = hippo.dplr_reconstruct(Lam, P, V)
    assert (R - A).abs().max().item() <= 1e-8
    assert (V @ Bv - B).abs().max().item() <= 1e-8
    assert (V.conj().T @ V - torch.eye(N, dtype=V.dtype)).abs().max().item() <= 1e-8  # unitary


def test_legs_normal_part_has_constant_real_part():
    Lam, *_ = hippo.nplr("legs", 16)
    torch.testing.assert_close(Lam.real, torch.full((16,), -0.5, dtype=torch.float64))


def test_legs_projection_reconstructs_history():
    """Online LegS: c' = (A c + B u)/t keeps the Legendre coefficients of u on [0, t]; the
    reconstruction Σ c_n sqrt(2n+1) P_n(2s/t - 1) of a smooth u improves as N grows."""
    T = 2000
    s = torch.linspace(0, 1, T + 1, dtype=torch.float64)[1:]
    u = torch.sin(6 * s) + 0.5 * s * torch.cos(13 * s)
    errs = []
    for N in (4, 8, 16):
        A, B = hippo.transition("legs", N)
        eye = torch.eye(N, dtype=torch.float64)
        c = torch.zeros(N, dtype=torch.float64)
        for k in range(T):  # bilinear step of the time-varying system at t = k + 1
            t = k + 1
            c = torch.linalg.solve(eye - A / (2 * t), (eye + A / (2 * t)) @ c + B * u[k] / t)
        z = 2 * s - 1
        Pn = [torch.ones_like(z), z]
        for n in range(1, N):
            Pn.append(((2 * n + 1) * z * Pn[n] - n * Pn[n - 1]) / (n + 1))
        rec = sum(c[n] * math.sqrt(2 * n + 1) * Pn[n] for n in range(N))
        errs.append(((rec - u).norm() / u.norm()).item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 5e-3, errs


@pytest.mark.parametrize(
    "args, exc, word",
    [
        (("legz", 8), ValueError, "measure"),
        ((3, 8), ValueError, "measure"),
        (("legs", 0), ValueError, "N"),
        (("legs", -4), ValueError, "N"),
        (("legs", 2.5), ValueError, "N"),
        (("fourier", 7), ValueError, "N"),
    ],
)
def test_bad_input(args, exc, word):
    with pytest.raises(exc, match=word):
        hippo.transition(*args)
    with pytest.raises(exc, match=word):
        hippo.nplr(*args)


def test_nplr_rank_too_small():
    with pytest.raises(ValueError, match="rank"):
        hippo.nplr("legt", 8, rank=1)
    with pytest.raises(ValueError, match="rank"):
        hippo.nplr("legs", 8, rank=0)
