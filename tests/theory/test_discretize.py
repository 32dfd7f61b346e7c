"""Discretisation rules: dense vs diagonal agree, ZOH is exact for constant input, batched Δ."""

import pytest
import torch

from ssmkit.theory import discretize, hippo


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler"])
def test_dense_matches_diagonal(method):
    fn = discretize.METHODS[method]
    a = torch.tensor([-0.5 + 1j, -1.0 + 0.3j, -2.0 + 0j], dtype=torch.complex128)
    b = torch.tensor([1.0, 0.5 - 1j, 2.0], dtype=torch.complex128)
    Ad, Bd = fn(a, b, 0.1)
    Af, Bf = fn(torch.diag(a), b, 0.1, diagonal=False)
    torch.testing.assert_close(torch.diagonal(Af), Ad)
    torch.testing.assert_close(Af - torch.diag(torch.diagonal(Af)), torch.zeros_like(Af))
    torch.testing.assert_close(Bf, Bd)


def test_zoh_exact_for_constant_input():
    """ZOH holds u constant over a step, so x(Δ) of the ODE with u = 1 equals Ā x0 + B̄."""
    A, B = hippo.transition("legs", 6)
    x0 = torch.randn(6, dtype=torch.float64)
    dt = 0.05
    Abar, Bbar = discretize.zoh(A, B, dt)
    # fine RK4 integration of x' = A x + B
    x, h = x0.clone(), dt / 2000
    for _ in range(2000):
        k1 = A @ x + B
        k2 = A @ (x + h / 2 * k1) + B
        k3 = A @ (x + h / 2 * k2) + B
        k4 = A @ (x + h * k3) + B
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(Abar @ x0 + Bbar, x, rtol=1e-10, atol=1e-10)


def test_zoh_singular_A():
    A = torch.zeros(3, 3, dtype=torch.float64)  # x' = B u: ZOH gives Ā = I, B̄ = ΔB
    B = torch.ones(3, dtype=torch.float64)
    Abar, Bbar = discretize.zoh(A, B, 0.2)
    torch.testing.assert_close(Abar, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Bbar, 0.2 * B)


def test_bilinear_formula_and_batched_dt():
    A, B = hippo.transition("legt", 4)
    dt = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    Abar, Bbar = discretize.bilinear(A, B, dt)
    assert Abar.shape == (3, 4, 4) and Bbar.shape == (3, 4)
    eye = torch.eye(4, dtype=torch.float64)
    for i, d in enumerate(dt):
        inv = torch.linalg.inv(eye - d / 2 * A)
        torch.testing.assert_close(Abar[i], inv @ (eye + d / 2 * A))
        torch.testing.assert_close(Bbar[i], inv @ (d * B))
    # batched dt with diagonal A (H, N)
    a = -torch.rand(3, 5, dtype=torch.float64)
    Ad, Bd = discretize.zoh(a, torch.ones(3, 5, dtype=torch.float64), dt, diagonal=True)
    torch.testing.assert_close(Ad, torch.exp(dt[:, None] * a))
    torch.testing.assert_close(Bd, torch.expm1(dt[:, None] * a) / a)


def test_euler():
    A, B = hippo.transition("lagt", 3)
    Abar, Bbar = discretize.euler(A, B, 0.1)
    torch.testing.assert_close(Abar, torch.eye(3, dtype=torch.float64) + 0.1 * A)
    torch.testing.assert_close(Bbar, 0.1 * B)


def test_bad_input():
    A, B = hippo.transition("legs", 4)
    with pytest.raises(ValueError, match="A"):
        discretize.zoh(A[:, :3], B, 0.1)
    with pytest.raises(ValueError, match="B"):
        discretize.zoh(A, B[:3], 0.1)
    with pytest.raises(ValueError, match="dt"):
        discretize.bilinear(A, B, -0.1)
    with pytest.raises(TypeError, match="A"):
        discretize.euler(A.long(), B, 0.1)
    with pytest.raises(TypeError, match="B"):
        discretize.zoh(A, [1, 2, 3, 4], 0.1)
