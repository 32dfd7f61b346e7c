"""S4D initialisations, log-uniform Δ and inverse_softplus."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.theory import hippo, init


def test_inverse_softplus():
    x = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(init.inverse_softplus(x)), x, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="x > 0"):
        init.inverse_softplus(torch.tensor([0.0]))


def test_log_uniform_dt_range_and_spread():
    dt = init.log_uniform_dt(20000, 1e-3, 1e-1)
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    logs = dt.log()
    # uniform in log space: mean at the middle, a quarter below the first quartile
    assert abs(logs.mean().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.05
    assert abs((logs < math.log(1e-3) + 0.25 * math.log(100)).float().mean().item() - 0.25) < 0.02
    assert init.log_uniform_dt((2, 3), floor=0.05).min() >= 0.05
    with pytest.raises(ValueError, match="dt_min"):
        init.log_uniform_dt(4, 0.1, 0.01)


def test_s4d_inits():
    N = 8
    A, B = init.s4d_init("diag-lin", N)
    torch.testing.assert_close(A, torch.complex(torch.full((N,), -0.5), math.pi * torch.arange(N).float()).to(A.dtype))
    A, _ = init.s4d_init("diag-inv", N)
    n = torch.arange(N, dtype=torch.float64)
    torch.testing.assert_close(A.imag, 2 * N / math.pi * (2 * N / (2 * n + 1) - 1))
    A, _ = init.s4d_init("diag-real", N)
    torch.testing.assert_close(A.real, -(n + 1))
    assert (A.imag == 0).all()
    A, B = init.s4d_init("legs", N)
    Lam, _, Bv, _ = hippo.nplr("legs", 2 * N)
    assert A.shape == (N,) and (A.imag > 0).all() and torch.allclose(A.real, torch.full((N,), -0.5, dtype=torch.float64))
    # every kept eigenvalue is one of LegS's, and its conjugate is the dropped one
    for a in A:
        assert (Lam - a).abs().min() < 1e-10 and (Lam - a.conj()).abs().min() < 1e-10


def test_s4d_init_bad():
    with pytest.raises(ValueError, match="init"):
        init.s4d_init("diag-foo", 4)
    with pytest.raises(ValueError, match="n_modes"):
        init.s4d_init("diag-lin", 0)
