"""The Triton SSD form (``backend="triton"``) against the reference recurrence, under the Triton
CPU interpreter when there is no GPU: outputs, final states and every gradient, in float64.
Covers seqlen 1, seqlens not a multiple of the kernels' chunk, G > 1, a head dimension
split over several row blocks in the backward's walks, D per head and per channel,
no options at all, the Δ clamp, and packed sequences with an empty one."""

import math

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

pytest.importorskip("triton")
from ssmkit.ops.ssd import ssd  # noqa: E402
from ssmkit.ops.ssd.triton import ssd_triton  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


@pytest.fixture(autouse=True, params=["fused forward", "split forward, dB/dC in one-head parts"])
def _forms(request, monkeypatch):
    """Both forwards (one walk over the chunks computing the outputs, or the states walk then
    every chunk's output at once), and the dB/dC pass with a group's heads in one program or
    one head per program (partial sums added on the host)."""
    import sys

    sdt = sys.modules["ssmkit.ops.ssd.triton"]
    split = request.param != "fused forward"
    monkeypatch.setattr(sdt, "FWD_SPLIT", split)
    monkeypatch.setattr(sdt, "DBC_HEADS", 1 if split else 8)


def _inputs(b, L, H, P, G, N, *, D="head", opts=True, nseq=None):
    dev = triton_device()
    g = torch.Generator().manual_seed(b * 1000 + L * 10 + H + P + N)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dev)

    x, dt, z = r(b, L, H, P), r(b, L, H, scale=0.5) - 1.0, r(b, L, H, P)
    A = -(torch.rand(H, generator=g, dtype=torch.float64) * 2 + 0.1).to(dev)
    B, C = r(b, L, G, N), r(b, L, G, N)
    Dt = r(H) if D == "head" else r(H, P)
    bias, h0 = r(H, scale=0.1), r(nseq or b, H, P, N)
    if not opts:
        Dt = z = bias = h0 = None
    return [x, dt, A, B, C, Dt, z, bias, h0]


def _check(ts, *, softplus=True, dt_limit=(0.0, math.inf), cu=None):
    ts = [None if t is None else t.requires_grad_() for t in ts]
    x, dt, A, B, C, D, z, bias, h0 = ts
    live = [(n, t) for n, t in zip(NAMES, ts) if t is not None]
    gen = torch.Generator().manual_seed(7)
    outs = {}
    for name in ("reference", "triton"):
        if name == "triton":
            y, hT = ssd_triton(x, dt, A, B, C, 64, D, z, bias, softplus, dt_limit, h0, True, cu)
        else:
            y, hT = ssd(x, dt, A, B, C, D, z, bias, dt_softplus=softplus, dt_limit=dt_limit,
                        initial_state=h0, return_final_state=True, cu_seqlens=cu, backend="reference")
        if not outs:
            gy = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
            gh = torch.randn(hT.shape, generator=gen, dtype=hT.dtype).to(hT.device)
        grads = torch.autograd.grad((y * gy).sum() + (hT * gh).sum(), [t for _, t in live])
        outs[name] = [y, hT, *grads]
    for label, got, want in zip(["y", "final_state", *(n for n, _ in live)], outs["triton"], outs["reference"]):
        assert_close(label, want, got, rel=1e-10)


@pytest.mark.parametrize("shape", [(2, 70, 4, 8, 2, 16), (1, 1, 2, 16, 1, 16), (2, 129, 2, 16, 1, 32),
                                   (1, 70, 2, 48, 1, 16)])
def test_against_reference(shape):
    _check(_inputs(*shape, D="channel" if shape[1] == 1 else "head"))


def test_no_options_and_no_softplus():
    _check(_inputs(2, 65, 2, 16, 1, 16, opts=False), softplus=False)


def test_dt_limit():
    _check(_inputs(1, 40, 2, 8, 1, 16), dt_limit=(0.2, 0.5))


def test_packed_with_empty_sequence():
    cu = torch.tensor([0, 30, 30, 100], device=triton_device())
    _check(_inputs(1, 100, 4, 8, 2, 16, nseq=3), cu=cu)


def test_strided_views_as_in_the_layer():
    """x, z, B, C and dt read as slices of one projection (row strides wider than the row), as
    the Mamba-2 layer passes them; gradients come back in plain layouts."""
    b, L, H, P, G, N = 2, 70, 4, 8, 2, 16
    ts = _inputs(b, L, H, P, G, N)
    x, dt, A, B, C, D, z, bias, h0 = ts
    parts = [x.reshape(b, L, -1), z.reshape(b, L, -1), B.reshape(b, L, -1), C.reshape(b, L, -1), dt]
    proj = torch.cat(parts + [torch.zeros(b, L, 3, dtype=x.dtype, device=x.device)], dim=-1)
    widths = [t.shape[-1] for t in parts] + [3]
    xv, zv, Bv, Cv, dtv, _ = proj.split(widths, dim=-1)
    views = [xv.view(b, L, H, P), dtv, A, Bv.view(b, L, G, N), Cv.view(b, L, G, N), D, zv.view(b, L, H, P), bias, h0]
    assert not views[0].is_contiguous()
    _check(views)


def test_without_the_final_state_no_state_gradient_is_read(monkeypatch):
    """Without ``return_final_state`` the forward's final state is a placeholder: the backward must
    not hand the kernels autograd's zeros of its shape as the state's gradient."""
    import sys

    sdt = sys.modules["ssmkit.ops.ssd.triton"]  # (ssmkit.ops.ssd also names the function)
    seen = []
    real = sdt.backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(sdt, "backward", spy)
    x, dt, A, B, C, D, z, bias, _ = [t.requires_grad_() if t is not None else None
                                     for t in _inputs(1, 70, 2, 8, 1, 16)]
    y = ssd_triton(x, dt, A, B, C, 64, D, z, bias, True)
    gx, gB = torch.autograd.grad(y.sum(), [x, B])
    assert seen == [None]
    yr = ssd(x, dt, A, B, C, D, z, bias, dt_softplus=True, backend="reference")
    rx, rB = torch.autograd.grad(yr.sum(), [x, B])
    assert_close("dx", rx, gx, rel=1e-10)
    assert_close("dB", rB, gB, rel=1e-10)
