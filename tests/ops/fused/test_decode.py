"""Triton decode kernels (conv-state shift + conv, selective state update with the optional fused
dt_proj) against the reference forms and float64, under the Triton CPU interpreter without a GPU;
states updated in place, strided inputs read in place."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

dec = pytest.importorskip("ssmkit.ops.fused.decode")
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_step  # noqa: E402
from ssmkit.ops.selective_scan.step import selective_scan_step_reference  # noqa: E402


@pytest.mark.parametrize("T,W,bias,act", [(1, 4, True, "silu"), (3, 4, False, None), (5, 2, True, "silu")])
def test_conv_update(T, W, bias, act):
    dev = triton_device()
    g = torch.Generator().manual_seed(T * 10 + W)
    x = torch.randn(2, T, 40, generator=g).to(dev)
    st = torch.randn(2, 40, W - 1, generator=g).to(dev)
    w = torch.randn(40, W, generator=g).to(dev)
    b = torch.randn(40, generator=g).to(dev) if bias else None
    st_ref = st.clone()
    y = dec.causal_conv1d_step_triton(x, st, w, b, act)
    yr = causal_conv1d_step(st_ref, x, w, b, activation=act, backend="reference")
    assert_close("y", yr, y, rel=1e-6)
    assert_close("conv_state", st_ref, st, rel=1e-7)
    y1 = dec.causal_conv1d_step_triton(x[:, 0], st, w, b, act)  # (batch, dim) form
    assert y1.shape == (2, 40)


@pytest.mark.parametrize("T,G,N", [(1, 1, 16), (3, 2, 5)])
def test_selective_scan_step(T, G, N):
    dev = triton_device()
    g = torch.Generator().manual_seed(T + G + N)
    bsz, dim = 2, 40
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    x, dt, z = r(bsz, T, dim), r(bsz, T, dim), r(bsz, T, dim)
    A = -torch.rand(dim, N, generator=g).to(dev)
    B, C, D, bias = r(bsz, T, G, N), r(bsz, T, G, N), r(dim), r(dim)
    s = r(bsz, dim, N)
    s_ref = s.clone()
    y = dec.selective_scan_step_triton(s, x, dt, A, B, C, D, z, bias, True)
    yr = selective_scan_step_reference(s_ref, x, dt, A, B, C, D, z, bias, True)
    assert_close("y", yr, y, rel=1e-5)
    assert_close("state", s_ref, s, rel=1e-5)


def test_registered_for_dispatch():
    from ssmkit.ops import dispatch

    assert "triton" in dispatch.available("selective_scan_step")
    assert "triton" in dispatch.available("causal_conv1d")
    assert "triton" in dispatch.available("causal_conv1d_step")
    assert dispatch.get("causal_conv1d_step", "triton") is dec.causal_conv1d_step_triton


@pytest.mark.parametrize("T", [1, 2])
def test_conv_update_strided_x_and_state(T):
    """x = the first half of a wider projection (row stride 2*dim), state stored transposed
    ((batch, W-1, dim) memory seen as (batch, dim, W-1)): both read and written in place."""
    dev = triton_device()
    g = torch.Generator().manual_seed(7 + T)
    dim, W = 48, 4
    xz = torch.randn(3, T, 2 * dim, generator=g).to(dev)
    x = xz[..., :dim]
    st_t = torch.randn(3, W - 1, dim, generator=g).to(dev)
    st = st_t.transpose(1, 2)  # (3, dim, W-1), non-contiguous
    st_ref = st.clone()
    w, b = torch.randn(dim, W, generator=g).to(dev), torch.randn(dim, generator=g).to(dev)
    y = dec.causal_conv1d_step_triton(x, st, w, b, "silu")
    yr = causal_conv1d_step(st_ref, x, w, b, activation="silu", backend="reference")
    assert_close("y", yr, y, rel=1e-6)
    assert_close("conv_state", st_ref, st, rel=1e-7)
    assert st.data_ptr() == st_t.data_ptr()


def _ssu_inputs(bsz, T, dim, N, R, seed):
    """x | z halves of one projection, dt_low | B | C slices of another (as Mamba.step has them)."""
    g = torch.Generator().manual_seed(seed)
    dev = triton_device()
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    xz = r(bsz, T, 2 * dim)
    dbc = r(bsz, T, R + 2 * N)
    W = r(dim, R) * R ** -0.5
    A = -torch.rand(dim, N, generator=g).to(dev) - 0.1
    return dict(x=xz[..., :dim], z=xz[..., dim:], dt_low=dbc[..., :R], B=dbc[..., R:R + N].unsqueeze(2),
                C=dbc[..., R + N:].unsqueeze(2), W=W, A=A, D=r(dim), bias=r(dim) - 1.0, s=r(bsz, dim, N))


@pytest.mark.parametrize("bsz,T,R", [(1, 1, 128), (3, 2, 20), (37, 1, 8)])
def test_selective_scan_step_fused_dt_proj_vs_float64(bsz, T, R):
    """dt_proj inside the kernel (dt = W dt_low), several batch rows per program at batch 37
    (a partial last block), against the float64 reference of the unfused step."""
    dim, N = 40, 16
    a = _ssu_inputs(bsz, T, dim, N, R, seed=bsz + T + R)
    s = a["s"].clone()
    y = dec.selective_scan_step_triton(s, a["x"], a["dt_low"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                          a["bias"], True, dt_proj_weight=a["W"])
    d64 = {k: v.double() for k, v in a.items()}
    s64 = d64["s"].clone()
    dt64 = d64["dt_low"] @ d64["W"].T
    yr = selective_scan_step_reference(s64, d64["x"], dt64, d64["A"], d64["B"], d64["C"], d64["D"], d64["z"],
                                     d64["bias"], True)
    assert_close("y", yr, y.double(), rel=2e-5)
    assert_close("state", s64, s.double(), rel=2e-5)


def test_selective_scan_step_unfused_strided_vs_float64():
    bsz, T, dim, N = 2, 1, 40, 16
    a = _ssu_inputs(bsz, T, dim, N, 16, seed=3)
    dt = a["x"] * 0.5  # any (batch, T, dim) strided view
    s = a["s"].clone()
    y = dec.selective_scan_step_triton(s, a["x"], dt, a["A"], a["B"], a["C"], a["D"], a["z"], a["bias"], True)
    d64 = {k: v.double() for k, v in a.items()}
    s64 = d64["s"].clone()
    yr = selective_scan_step_reference(s64, d64["x"], dt.double(), d64["A"], d64["B"], d64["C"], d64["D"],
                                     d64["z"], d64["bias"], True)
    assert_close("y", yr, y.double(), rel=2e-5)
    assert_close("state", s64, s.double(), rel=2e-5)


@pytest.mark.parametrize("W,bias,block_d", [(4, True, 16), (2, False, 64), (4, True, 256)])
def test_conv_update_proj_matches_reference(W, bias, block_d, monkeypatch):
    """Conv update + x_proj split over channel blocks: xs, the conv state and the sum of the parts
    equal the reference (conv update, then the projection) in float64."""
    dev = triton_device()
    monkeypatch.setitem(dec.CONV_PROJ, "block_d", block_d)
    g = torch.Generator().manual_seed(W * 3 + block_d)
    dim, n_out = 70, 37
    x = torch.randn(2, 2 * dim, generator=g, dtype=torch.float64).to(dev)[:, :dim]  # a view
    st = torch.randn(2, dim, W - 1, generator=g, dtype=torch.float64).to(dev)
    w = torch.randn(dim, W, generator=g, dtype=torch.float64).to(dev)
    b = torch.randn(dim, generator=g, dtype=torch.float64).to(dev) if bias else None
    pw = torch.randn(n_out, dim, generator=g, dtype=torch.float64).to(dev)
    st_ref = st.clone()
    xs_ref, parts_ref = dec.causal_conv1d_step_proj_reference(x, st_ref, w, b, "silu", pw)
    xs, parts = dec.causal_conv1d_step_proj_triton(x, st, w, b, "silu", pw)
    assert parts.shape == (-(-dim // block_d), 2, n_out) and parts.dtype == torch.float32
    assert_close("xs", xs_ref, xs, rel=1e-6)  # (float32 arithmetic in the kernel)
    assert_close("conv_state", st_ref, st, rel=0.0, atol=0.0)
    assert_close("x_proj", parts_ref.sum(0), parts.sum(0), rel=1e-6)


@pytest.mark.parametrize("P", [1, 5])
def test_state_update_parts_matches_reference(P):
    """The state update from x_proj's parts (summed, rounded), dt_proj inside, in float64."""
    dev = triton_device()
    g = torch.Generator().manual_seed(P)
    bsz, dim, N, R = 2, 48, 8, 6
    f64 = dict(generator=g, dtype=torch.float64)
    state = torch.randn(bsz, dim, N, **f64).to(dev)
    x = torch.randn(bsz, dim, **f64).to(dev)
    z = torch.randn(bsz, 2 * dim, **f64).to(dev)[:, dim:]  # a view
    parts = torch.randn(P, bsz, R + 2 * N, **f64).to(dev) / P
    A = -torch.rand(dim, N, **f64).to(dev)
    D = torch.randn(dim, **f64).to(dev)
    bias = torch.randn(dim, **f64).to(dev) * 0.1
    wdt = torch.randn(dim, R, **f64).to(dev) * 0.3
    s_ref = state.clone()
    y_ref = dec.selective_scan_step_parts_reference(s_ref, x, parts, A, D, z, bias, wdt)
    y = dec.selective_scan_step_parts_triton(state, x, parts, A, D, z, bias, wdt)
    assert_close("y", y_ref, y, rel=1e-6)
    assert_close("state", s_ref, state, rel=1e-6)
