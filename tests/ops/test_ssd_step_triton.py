"""The Triton SSD decode step (``ssd_step(..., backend="triton")``) against the reference step, under
the Triton CPU interpreter without a GPU: outputs and the state updated in place, in float64, and
float32/bfloat16 inputs (float32 state) to tolerances from their rounding; T = 1 and T = 3
tokens, groups, D per head and per channel, and a state pool addressed by ``state_batch_indices``
(permuted, partial, with padding rows)."""

import pytest
import torch

from ssmkit.ops.ssd import ssd_step
from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

pytest.importorskip("triton")


def _inputs(b, T, H, P, G, N, dtype, *, D="head", opts=True, pool=None, seed=0):
    dev = triton_device()
    g = torch.Generator().manual_seed(seed + b * 100 + T * 10 + H + P + N)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dev)

    x, z = r(b, T, H, P).to(dtype), r(b, T, H, P).to(dtype)
    dt = (r(b, T, H, scale=0.5) - 1.0).to(dtype)
    B, C = r(b, T, G, N).to(dtype), r(b, T, G, N).to(dtype)
    A = -(torch.rand(H, generator=g, dtype=torch.float64) * 2 + 0.1).to(dev)
    Dt = r(H) if D == "head" else r(H, P)
    bias = r(H, scale=0.1)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    state = r(pool or b, H, P, N).to(sdt)
    if not opts:
        Dt = z = bias = None
    return state, [x, dt, A, B, C, Dt, z, bias]


def _both(state, args, rel, *, T1=False, **kw):
    x, dt, A, B, C, D, z, bias = args
    if T1:
        x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
        z = None if z is None else z[:, 0]
    out = {}
    for name in ("reference", "triton"):
        s = state.clone()
        y = ssd_step(s, x, dt, A, B, C, D, z, bias, backend=name, **kw)
        out[name] = (y, s)
    assert out["triton"][0].dtype == x.dtype and out["triton"][0].shape == x.shape
    assert_close("y", out["reference"][0], out["triton"][0], rel=rel)
    assert_close("state", out["reference"][1], out["triton"][1], rel=rel)
    return out


@pytest.mark.parametrize("T,G,D", [(1, 1, "head"), (3, 2, "channel")])
def test_against_reference_float64(T, G, D):
    state, args = _inputs(2, T, 4, 12, G, 16, torch.float64, D=D)
    _both(state, args, 1e-12, T1=T == 1, dt_softplus=True)


def test_no_options_and_dt_limit():
    state, args = _inputs(2, 3, 2, 8, 1, 5, torch.float64, opts=False)
    _both(state, args, 1e-12)
    state, args = _inputs(2, 3, 2, 8, 1, 5, torch.float64)
    _both(state, args, 1e-12, dt_softplus=True, dt_limit=(0.2, 0.5))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_half_and_single_inputs(dtype, rel):
    """Both forms compute in float32 from the same rounded inputs; y is rounded to the input dtype
    once (bf16: 2^-8 relative), the float32 state agrees to float32 rounding."""
    state, args = _inputs(2, 3, 4, 16, 2, 32, dtype, D="channel")
    out = _both(state, args, rel, dt_softplus=True)
    assert_close("state (float32)", out["reference"][1], out["triton"][1], rel=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_state_pool(T):
    """Rows read and write a permuted part of a larger pool; -1 rows are padding (y = 0) and the
    pool rows nobody names are left exactly as they were."""
    state, args = _inputs(4, T, 4, 8, 2, 16, torch.float64, pool=6)
    idx = torch.tensor([4, -1, 0, 2], device=state.device)
    out = _both(state, args, 1e-12, T1=T == 1, dt_softplus=True, state_batch_indices=idx)
    y, s = out["triton"]
    assert (y[1] == 0).all()
    for untouched in (1, 3, 5):
        assert torch.equal(s[untouched], state[untouched])
    # the same rows stepped without a pool (the reference form on a gathered batch)
    rows = torch.tensor([4, 0, 2])
    x, dt, A, B, C, D, z, bias = (t if t is None or t.dim() < 3 else t[[0, 2, 3]] for t in args)
    if T == 1:
        x, dt, B, C, z = x[:, 0], dt[:, 0], B[:, 0], C[:, 0], z[:, 0]
    sub = state[rows].clone()
    want = ssd_step(sub, x, dt, A, B, C, D, z, bias, dt_softplus=True, backend="reference")
    assert_close("y (gathered)", want, y[[0, 2, 3]], rel=1e-12)
    assert_close("pool rows", sub, s[rows], rel=1e-12)


def test_strided_views_as_in_the_layer():
    """x, B, C, z and dt as slices of one projection (rows wider than the slice), read in place."""
    dev = triton_device()
    g = torch.Generator().manual_seed(3)
    b, T, H, P, G, N = 2, 2, 4, 8, 2, 16
    proj = torch.randn(b, T, 2 * H * P + 2 * G * N + H, generator=g, dtype=torch.float64).to(dev)
    z, x, Bf, Cf, dt = proj.split([H * P, H * P, G * N, G * N, H], -1)
    x, z = x.view(b, T, H, P), z.view(b, T, H, P)
    B, C = Bf.view(b, T, G, N), Cf.view(b, T, G, N)
    A = -torch.rand(H, generator=g, dtype=torch.float64).to(dev) - 0.1
    state = torch.randn(b, H, P, N, generator=g, dtype=torch.float64).to(dev)
    _both(state, [x, dt, A, B, C, torch.ones(H, dtype=torch.float64, device=dev), z, None], 1e-12,
          dt_softplus=True)


def test_bad_state_batch_indices():
    state, (x, dt, A, B, C, D, z, bias) = _inputs(2, 1, 2, 4, 1, 4, torch.float64, pool=3)
    with pytest.raises(ValueError, match="state_batch_indices must be < the state pool"):
        ssd_step(state, x, dt, A, B, C, state_batch_indices=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="must not repeat"):
        ssd_step(state, x, dt, A, B, C, state_batch_indices=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"shape \(batch=2,\)"):
        ssd_step(state, x, dt, A, B, C, state_batch_indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="state must have shape"):
        ssd_step(state, x, dt, A, B, C)  # a pool without indices
