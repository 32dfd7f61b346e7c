"""The Triton causal conv1d (``backend="triton"``) against the reference form, under the Triton
CPU interpreter without a GPU: outputs, final states and gradients of every input."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

ct = pytest.importorskip("ssmkit.ops.conv.causal_conv1d_triton")
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_reference  # noqa: E402


def _check(bsz, L, dim, W, act, with_init, with_bias, cu=None, dtype=torch.float32, rel=1e-5):
    dev = triton_device()
    g = torch.Generator().manual_seed(L * 7 + dim + W)
    nseq = bsz if cu is None else len(cu) - 1
    x = torch.randn(bsz, L, dim, generator=g, dtype=dtype).to(dev).requires_grad_()
    w = torch.randn(dim, W, generator=g, dtype=dtype).to(dev).requires_grad_()
    b = torch.randn(dim, generator=g, dtype=dtype).to(dev).requires_grad_() if with_bias else None
    h0 = (torch.randn(nseq, dim, W - 1, generator=g, dtype=dtype).to(dev).requires_grad_()
          if with_init else None)
    cu_t = torch.tensor(cu, device=dev) if cu is not None else None
    y, f = ct.causal_conv1d_triton(x, w, b, act, h0, True, cu_t)
    yr, fr = causal_conv1d_reference(x, w, b, act, h0, True, cu_t)
    assert_close("y", yr, y, rel=rel)
    assert_close("final_state", fr, f, rel=rel)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    leaves = [t for t in (x, w, b, h0) if t is not None]
    g1 = torch.autograd.grad((y * gy).sum() + (f * gf).sum(), leaves)
    g2 = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), leaves)
    for n, a, c in zip(("x", "weight", "bias", "initial_state"), g2, g1):
        assert_close(f"grad {n}", a, c, rel=rel)


@pytest.mark.parametrize(
    "bsz,L,dim,W,act,init,bias",
    [(2, 70, 20, 4, "silu", False, True), (1, 5, 8, 4, None, True, False),
     (2, 2, 8, 4, "silu", True, True), (1, 9, 70, 3, "silu", False, False)],
)
def test_matches_reference(bsz, L, dim, W, act, init, bias):
    _check(bsz, L, dim, W, act, init, bias)


@pytest.mark.parametrize("init", [False, True])
def test_cu_seqlens(init):
    _check(1, 12, 8, 4, "silu", init, True, cu=[0, 2, 2, 9, 12])


def test_float64():
    _check(2, 10, 8, 4, "silu", True, True, dtype=torch.float64, rel=1e-6)
