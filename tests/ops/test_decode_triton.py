"""Triton decode kernels (conv-state shift + conv, selective state update) against the reference
forms, under the Triton CPU interpreter without a GPU; states updated in place."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

dec = pytest.importorskip("ssmkit.ops.decode_triton")
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_update  # noqa: E402
from ssmkit.ops.selective_scan.step import selective_state_update_step  # noqa: E402


@pytest.mark.parametrize("T,W,bias,act", [(1, 4, True, "silu"), (3, 4, False, None), (5, 2, True, "silu")])
def test_conv_update(T, W, bias, act):
    dev = triton_device()
    g = torch.Generator().manual_seed(T * 10 + W)
    x = torch.randn(2, T, 40, generator=g).to(dev)
    st = torch.randn(2, 40, W - 1, generator=g).to(dev)
    w = torch.randn(40, W, generator=g).to(dev)
    b = torch.randn(40, generator=g).to(dev) if bias else None
    st_ref = st.clone()
    y = dec.causal_conv1d_update_triton(x, st, w, b, act)
    yr = causal_conv1d_update(x, st_ref, w, b, act)
    assert_close("y", yr, y, rel=1e-6)
    assert_close("conv_state", st_ref, st, rel=1e-7)
    y1 = dec.causal_conv1d_update_triton(x[:, 0], st, w, b, act)  # (batch, dim) form
    assert y1.shape == (2, 40)


@pytest.mark.parametrize("T,G,N", [(1, 1, 16), (3, 2, 5)])
def test_selective_state_update(T, G, N):
    dev = triton_device()
    g = torch.Generator().manual_seed(T + G + N)
    bsz, dim = 2, 40
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    x, dt, z = r(bsz, T, dim), r(bsz, T, dim), r(bsz, T, dim)
    A = -torch.rand(dim, N, generator=g).to(dev)
    B, C, D, bias = r(bsz, T, G, N), r(bsz, T, G, N), r(dim), r(dim)
    s = r(bsz, dim, N)
    s_ref = s.clone()
    y = dec.selective_state_update_triton(s, x, dt, A, B, C, D, z, bias, True)
    yr = selective_state_update_step(s_ref, x, dt, A, B, C, D, z, bias, True)
    assert_close("y", yr, y, rel=1e-5)
    assert_close("state", s_ref, s, rel=1e-5)


def test_registered_for_dispatch():
    from ssmkit.ops import dispatch

    assert "triton" in dispatch.available("selective_state_update")
    assert "triton" in dispatch.available("causal_conv1d")
