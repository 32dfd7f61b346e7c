"""Triton causal conv1d and decode kernels on a CUDA device vs the reference forms (marked gpu)."""

import pytest
import torch

from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

ct = pytest.importorskip("ssmkit.ops.conv.causal_conv1d_triton")
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_reference, causal_conv1d_step  # noqa: E402
from ssmkit.ops.fused.decode import (  # noqa: E402
    causal_conv1d_step_triton,
    selective_scan_step_triton,
)
from ssmkit.ops.selective_scan.step import selective_scan_step_reference  # noqa: E402


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 5, 5, 1000, 1337]])
def test_conv_fwd_bwd(init, cu):
    bsz = 2 if cu is None else 1
    L, dim, W = 1337, 200, 4
    nseq = bsz if cu is None else len(cu) - 1
    x = torch.randn(bsz, L, dim, device="cuda", requires_grad=True)
    w = torch.randn(dim, W, device="cuda", requires_grad=True)
    b = torch.randn(dim, device="cuda", requires_grad=True)
    h0 = torch.randn(nseq, dim, W - 1, device="cuda", requires_grad=True) if init else None
    cu_t = torch.tensor(cu, device="cuda") if cu else None
    y, f = ct.causal_conv1d_triton(x, w, b, "silu", h0, True, cu_t)
    yr, fr = causal_conv1d_reference(x, w, b, "silu", h0, True, cu_t)
    assert rel_err(yr, y) < 1e-5 and rel_err(fr, f) < 1e-6
    leaves = [t for t in (x, w, b, h0) if t is not None]
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad((y * gy).sum() + f.sum(), leaves)
    g2 = torch.autograd.grad((yr * gy).sum() + fr.sum(), leaves)
    for a, c in zip(g2, g1):
        assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("T", [1, 4])
def test_decode_kernels(T):
    bsz, dim, N, G, W = 3, 300, 16, 1, 4
    x = torch.randn(bsz, T, dim, device="cuda")
    st = torch.randn(bsz, dim, W - 1, device="cuda")
    st2 = st.clone()
    w, b = torch.randn(dim, W, device="cuda"), torch.randn(dim, device="cuda")
    assert rel_err(causal_conv1d_step(st2, x, w, b, activation="silu", backend="reference"),
                   causal_conv1d_step_triton(x, st, w, b, "silu")) < 1e-6
    assert torch.allclose(st, st2)
    s = torch.randn(bsz, dim, N, device="cuda")
    s2 = s.clone()
    dt = torch.randn(bsz, T, dim, device="cuda")
    A = -torch.rand(dim, N, device="cuda") * 4
    B, C = torch.randn(bsz, T, G, N, device="cuda"), torch.randn(bsz, T, G, N, device="cuda")
    D, z, bias = torch.randn(dim, device="cuda"), torch.randn(bsz, T, dim, device="cuda"), torch.randn(dim, device="cuda")
    y1 = selective_scan_step_triton(s, x, dt, A, B, C, D, z, bias, True)
    y2 = selective_scan_step_reference(s2, x, dt, A, B, C, D, z, bias, True)
    assert rel_err(y2, y1) < 1e-5 and rel_err(s2, s) < 1e-5
