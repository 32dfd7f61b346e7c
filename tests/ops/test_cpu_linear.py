"""ssmkit.ops.cpu_linear: oneDNN's float32 product against the float64 product within float32's
rounding bound, for the shapes the layers use (one row, many rows, 3-D and row-strided inputs,
with and without bias), and F.linear wherever the fast form does not apply."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import cpu_linear
from ssmkit.testing import matmul_error_bound

needs_onednn = pytest.mark.skipif(not cpu_linear.fast_form_available(), reason="PyTorch built without oneDNN")


def _inputs(shape, k, n, bias, gen):
    x = torch.randn(*shape, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


def _assert_within_rounding(y, x, w, b):
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    tol = matmul_error_bound(x, w, torch.float32) + 2 * torch.finfo(torch.float32).eps * exact.abs()
    assert y.dtype == torch.float32 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= tol).all(), (y.double() - exact).abs().max()


@needs_onednn
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7,), (2, 5), (0,)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_form_within_float32_rounding(shape, bias, onednn_calls):
    x, w, b = _inputs(shape, 96, 40, bias, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = cpu_linear.linear(x, w, b)
    assert onednn_calls[0] == 1
    _assert_within_rounding(y, x, w, b)


@needs_onednn
def test_row_strided_input(onednn_calls):
    """A column slice (as the layers' split projections give) is read through its row stride."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 200, generator=g)
    x = wide[:, 30:126]
    w = torch.randn(24, 96, generator=g)
    with torch.no_grad():
        y = cpu_linear.linear(x, w)
    assert onednn_calls[0] == 1
    _assert_within_rounding(y, x, w, None)


def test_autograd_runs_f_linear(onednn_calls):
    g = torch.Generator().manual_seed(2)
    x, w, b = _inputs((3,), 16, 8, True, g)
    w.requires_grad_()
    y = cpu_linear.linear(x, w, b)
    y.square().sum().backward()
    assert onednn_calls[0] == 0
    w2 = w.detach().clone().requires_grad_()
    F.linear(x, w2, b).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float64", "bfloat16", "transposed weight"])
def test_other_inputs_run_f_linear(case, onednn_calls):
    g = torch.Generator().manual_seed(3)
    x, w, b = _inputs((4,), 32, 8, True, g)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "bfloat16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    else:
        w = w.T.contiguous().T
    with torch.inference_mode():
        y = cpu_linear.linear(x, w, b)
    assert onednn_calls[0] == 0
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)


def test_without_onednn_runs_f_linear(monkeypatch, onednn_calls):
    monkeypatch.setattr(cpu_linear, "_available", False)
    x, w, b = _inputs((4,), 32, 8, True, torch.Generator().manual_seed(4))
    with torch.inference_mode():
        y = cpu_linear.linear(x, w, b)
    assert onednn_calls[0] == 0
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)


def test_probe_failure_means_unavailable(monkeypatch):
    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(cpu_linear, "_available", None)
    monkeypatch.setattr(cpu_linear, "_onednn", broken)
    assert cpu_linear.fast_form_available() is False
    x, w, b = _inputs((2,), 8, 4, True, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(cpu_linear.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
