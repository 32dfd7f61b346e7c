"""SSM convolution kernels: fast forms == powering Ā (float64), gradients, bad input."""

import pytest
import torch

from ssmkit.ops.conv.ssm_kernel import dplr_bilinear, ssm_kernel_diag, ssm_kernel_dplr
from ssmkit.testing import assert_close as _assert_close
from ssmkit.theory import discretize, hippo


def assert_close(name, ref, out, rel):
    """Complex tensors are compared through their (real, imag) view."""
    as_real = lambda t: torch.view_as_real(t.resolve_conj()) if t.is_complex() else t  # noqa: E731
    return _assert_close(name, as_real(ref), as_real(out), rel=rel)


def _diag_inputs(H=3, N=5, lead=(2,)):
    log_Abar = torch.complex(-torch.rand(H, N, dtype=torch.float64) * 0.1, torch.randn(H, N, dtype=torch.float64))
    W = torch.randn(*lead, H, N, dtype=torch.complex128)
    return log_Abar.requires_grad_(), W.requires_grad_()


def test_diag_vandermonde_matches_powering():
    log_Abar, W = _diag_inputs()
    ref = ssm_kernel_diag(log_Abar, W, 300, backend="reference")
    out = ssm_kernel_diag(log_Abar, W, 300, backend="chunked")
    assert out.shape == (2, 300, 3)
    assert_close("K", ref, out, rel=1e-12)
    g = torch.randn_like(ref)
    for name, a, b in zip(
        ("log_Abar", "W"),
        torch.autograd.grad(ref, (log_Abar, W), g),
        torch.autograd.grad(out, (log_Abar, W), g),
    ):
        assert_close(f"grad {name}", a, b, rel=1e-10)


def _dplr_inputs(H=2, N=8, rank=1, lead=(), Cc=2):
    Lam, P, B, _ = hippo.nplr("legs", N, rank)
    Lam = (Lam + 0.05 * torch.randn(H, N, dtype=torch.complex128)).requires_grad_()
    P = (P[:, None] + 0.1 * torch.randn(rank, H, N, dtype=torch.complex128)).requires_grad_()
    Q = (P.detach() + 0.1 * torch.randn(rank, H, N, dtype=torch.complex128)).requires_grad_()
    B = (B.expand(*lead, H, N) + 0.1 * torch.randn(*lead, H, N, dtype=torch.complex128)).requires_grad_()
    C = torch.randn(Cc, H, N, dtype=torch.complex128, requires_grad=True)
    dt = torch.tensor([0.01, 0.3][:H] + [0.1] * max(0, H - 2), dtype=torch.float64, requires_grad=True)
    return Lam, P, Q, B, C, dt


@pytest.mark.parametrize("L, rank, lead", [(64, 1, ()), (257, 2, (3,)), (1, 1, ())])
def test_dplr_cauchy_matches_powering(L, rank, lead):
    args = _dplr_inputs(rank=rank, lead=lead)
    ref = ssm_kernel_dplr(*args, L, backend="reference")
    out = ssm_kernel_dplr(*args, L, backend="chunked")
    assert out.shape == (*lead, 2, L, 2)
    assert_close("K", ref, out, rel=1e-10)
    g = torch.randn_like(ref)
    names = ("Lam", "P", "Q", "B", "C", "dt")
    for name, a, b in zip(names, torch.autograd.grad(ref, args, g), torch.autograd.grad(out, args, g)):
        assert_close(f"grad {name}", a, b, rel=1e-9)


def test_dplr_matches_dense_hippo_bilinear():
    """With Λ, P, B, C of LegS's NPLR form, the kernel is C_orig Ā^l B̄ of the dense HiPPO matrix."""
    N, L, dt = 16, 100, 0.05
    Lam, P, Bv, V = hippo.nplr("legs", N)
    A, B = hippo.transition("legs", N)
    c = torch.randn(N, dtype=torch.float64)
    Cv = V.T @ c.to(V.dtype)  # c^T x = c^T V x_eig  ->  C_eig = V^T c
    K = ssm_kernel_dplr(Lam[None], P[:, None], P[:, None], Bv[None], Cv[None, None], torch.tensor([dt], dtype=torch.float64), L)
    Abar, Bbar = discretize.bilinear(A, B, dt)
    v, ref = Bbar, []
    for _ in range(L):
        ref.append(c @ v)
        v = Abar @ v
    assert_close("K", torch.stack(ref), K[0, :, 0].real, rel=1e-10)
    assert K.imag.abs().max() < 1e-10


def test_dplr_bilinear_helper_shapes():
    Lam, P, Q, B, C, dt = _dplr_inputs(lead=(4,))
    Abar, Bbar = dplr_bilinear(Lam, P, Q, B, dt)
    assert Abar.shape == (2, 8, 8) and Bbar.shape == (4, 2, 8)


def test_bad_input():
    log_Abar, W = _diag_inputs()
    with pytest.raises(ValueError, match="W"):
        ssm_kernel_diag(log_Abar, W[..., :4], 10)
    with pytest.raises(ValueError, match="log_Abar"):
        ssm_kernel_diag(log_Abar[0], W, 10)
    with pytest.raises(ValueError, match="L"):
        ssm_kernel_diag(log_Abar, W, 0)
    Lam, P, Q, B, C, dt = _dplr_inputs()
    with pytest.raises(ValueError, match="P"):
        ssm_kernel_dplr(Lam, P[:, :1], Q, B, C, dt, 8)
    with pytest.raises(ValueError, match="C"):
        ssm_kernel_dplr(Lam, P, Q, B, C[..., :3], dt, 8)
    with pytest.raises(ValueError, match="dt"):
        ssm_kernel_dplr(Lam, P, Q, B, C, dt[:1], 8)
    with pytest.raises(TypeError, match="B"):
        ssm_kernel_dplr(Lam, P, Q, B.real.long(), C, dt, 8)
