"""The compiled batch-1 GEMV of CPU decoding (ssmkit.ops.cpu_gemv) against its float64 reference,
for float32, bfloat16 and int8 weights, with and without bias; where it does not apply; and the
eager fallback when compiling fails."""

import warnings

import pytest
import torch

from ssmkit.layers.quantized import quantize_int8
from ssmkit.ops import cpu_compile, cpu_gemv
from ssmkit.ops.cpu_compile import compiler_available, set_cpu_compile
from ssmkit.testing import matmul_error_bound

pytestmark = pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler for Inductor")


def _weights(dtype, n, k, gen):
    """(weight, scale or None, the float64 weight it stands for)."""
    w = torch.randn(n, k, generator=gen)
    if dtype == torch.int8:
        q, s = quantize_int8(w)
        return q, s, q.double() * s.double()[:, None]
    w = w.to(dtype)
    return w, None, w.double()


# each case compiles a kernel (~1-3 s): one per weight dtype in the default run, the rest slow
_CASES = [(torch.float32, True), (torch.bfloat16, False), (torch.int8, True)]
_SLOW = [(torch.float32, False), (torch.bfloat16, True), (torch.int8, False)]


@pytest.mark.parametrize("wdtype,bias", _CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in _SLOW])
def test_compiled_linear_matches_reference(cpu_compiled, wdtype, bias):
    gen = torch.Generator().manual_seed(0)
    xdtype = torch.bfloat16 if wdtype == torch.bfloat16 else torch.float32
    for n, k in [(21, 40)]:  # K: whole vectors and a tail
        w, s, w64 = _weights(wdtype, n, k, gen)
        x = torch.randn(1, k, generator=gen).to(xdtype)
        b = torch.randn(n, generator=gen).to(xdtype) if bias else None
        y = cpu_gemv.compiled_linear(x, w, b, scale=s)
        assert y is not None and y.shape == (1, n) and y.dtype == xdtype
        exact = cpu_gemv.reference(x.double(), w if s is not None else w.double(),
                                   None if b is None else b.double(), scale=None if s is None else s.double())
        # float32 accumulation (any order) + the scale and bias in float32 + the output's rounding
        tol = (2 * matmul_error_bound(x, w64, torch.float32)
               + 4 * torch.finfo(torch.float32).eps * (exact.abs() + (0 if b is None else b.double().abs()))
               + torch.finfo(xdtype).eps * exact.abs())
        assert ((y.double() - exact).abs() <= tol).all(), (y.double() - exact).abs().max()


def test_compiled_linear_does_not_apply(cpu_compiled):
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    assert cpu_gemv.compiled_linear(x, w) is None  # batch 2: the eager form
    assert cpu_gemv.compiled_linear(x[:1], w.t().contiguous().t()) is None  # not a contiguous (out, in)
    q, s = quantize_int8(w)
    assert cpu_gemv.compiled_linear(x[:1], q) is None  # int8 without its scale
    set_cpu_compile(False)
    assert cpu_gemv.compiled_linear(x[:1], w) is None


def test_compile_failure_falls_back(cpu_compiled, monkeypatch):
    import torch._inductor.compile_fx as cfx

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cfx, "compile_fx", broken)
    monkeypatch.setattr(cpu_compile, "_failed", set())
    monkeypatch.setattr(cpu_compile, "_graphs", {})
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_gemv.compiled_linear(x, w) is None  # the caller runs its eager form
        assert cpu_gemv.compiled_linear(x, w) is None  # remembered: no second attempt, no second warning
    assert "cpu_gemv" in cpu_compile._failed
    assert sum("cpu_gemv" in str(w.message) for w in caught) == 1
