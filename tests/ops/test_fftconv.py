"""Causal FFT convolution vs the direct sum: outputs and gradients, shapes, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops.conv.fftconv import fftconv
from ssmkit.testing import assert_close


@pytest.mark.parametrize(
    "u_shape, k_shape, d_shape",
    [((2, 37, 3), (37, 3), (3,)), ((1, 50, 2, 3), (20, 2, 3), (2, 3)), ((3, 16, 4), (40, 4), None),
     ((2, 1, 5), (1, 5), (5,))],
)
def test_fft_matches_direct(u_shape, k_shape, d_shape):
    u = torch.randn(u_shape, dtype=torch.float64, requires_grad=True)
    K = torch.randn(k_shape, dtype=torch.float64, requires_grad=True)
    D = None if d_shape is None else torch.randn(d_shape, dtype=torch.float64, requires_grad=True)
    ref = fftconv(u, K, D, backend="reference")
    out = fftconv(u, K, D, backend="chunked")
    assert out.shape == u.shape
    assert_close("y", ref, out, rel=1e-12)
    g = torch.randn_like(ref)
    inputs = [t for t in (u, K, D) if t is not None]
    g_ref = torch.autograd.grad(ref, inputs, g)
    g_out = torch.autograd.grad(out, inputs, g)
    for name, a, b in zip("uKD", g_ref, g_out):
        assert_close(f"grad {name}", a, b, rel=1e-12)


def test_direct_sum_by_hand():
    u = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    K = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    y = fftconv(u, K, torch.tensor([0.5], dtype=torch.float64), backend="chunked")
    torch.testing.assert_close(y[0, :, 0], torch.tensor([1.0 + 0.5, 2 + 10 + 1.0, 3 + 20 + 100 + 1.5], dtype=torch.float64))


def test_float32_and_bf16_keep_dtype():
    u = torch.randn(2, 64, 3)
    K = torch.randn(64, 3)
    ref = fftconv(u.double(), K.double(), backend="reference")
    assert_close("fp32", ref, fftconv(u, K), rel=1e-5)
    yb = fftconv(u.bfloat16(), K)
    assert yb.dtype == torch.bfloat16
    assert_close("bf16", ref, yb, rel=2e-2)


def test_gradcheck_tiny():
    u = torch.randn(1, 5, 1, dtype=torch.float64, requires_grad=True)
    K = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    D = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fftconv(a, b, c, backend="chunked"), (u, K, D))


def test_bad_input():
    u = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="K"):
        fftconv(u, torch.randn(8, 3, 1))
    with pytest.raises(ValueError, match="u"):
        fftconv(torch.randn(8), torch.randn(8))
    with pytest.raises(TypeError, match="u"):
        fftconv(u.long(), torch.randn(8, 3))
    with pytest.raises(ValueError, match="channels"):
        fftconv(u, torch.randn(8, 4))
    with pytest.raises(TypeError, match="K"):
        fftconv(u, "kernel")
    with pytest.raises(ValueError, match="backend"):
        fftconv(u, torch.randn(8, 3), backend="nope")


@settings(max_examples=15)
@given(
    batch=st.integers(1, 3),
    L=st.integers(1, 70),
    Lk=st.integers(1, 90),
    H=st.integers(1, 4),
    with_D=st.booleans(),
)
def test_fft_matches_direct_any_shape(batch, L, Lk, H, with_D):
    g = torch.Generator().manual_seed(L * 1000 + Lk)
    u = torch.randn(batch, L, H, dtype=torch.float64, generator=g)
    K = torch.randn(Lk, H, dtype=torch.float64, generator=g)
    D = torch.randn(H, dtype=torch.float64, generator=g) if with_D else None
    assert_close("y", fftconv(u, K, D, backend="reference"), fftconv(u, K, D, backend="chunked"), rel=1e-12)
