"""Mamba-2's gated RMSNorm (ssmkit.ops.fused.gated_norm): the reference form against a float64
formula written from the definition, and the Triton form (under the interpreter without a GPU)
against float64: output and the gradients of x, z and weight, with the gate before and after the
norm, without z, groups narrower than d, strided z (a slice of a projection) and bf16 inputs."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.fused.gated_norm import gated_rms_norm
from ssmkit.testing import assert_close, triton_device


def _formula(x, w, z, eps, gs, nbg):
    """float64, from the definition: rms over groups of gs channels, the gate before or after."""
    x, w = x.double(), w.double()
    z = None if z is None else z.double()
    u = x * F.silu(z) if (z is not None and not nbg) else x
    ug = u.unflatten(-1, (-1, gs))
    y = (ug / torch.sqrt(ug.square().mean(-1, keepdim=True) + eps)).flatten(-2) * w
    return y * F.silu(z) if (z is not None and nbg) else y


def _inputs(shape, gs, dtype, with_z, seed=0, dev=None):
    g = torch.Generator().manual_seed(seed + sum(shape) + gs)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    z = torch.randn(*shape, generator=g, dtype=torch.float64) if with_z else None
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dev or "cpu", dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w), cast(z)


def _grads(y, ts, seed=1):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    live = [t for t in ts if t is not None]
    return torch.autograd.grad((y.double() * gy.to(y.device)).sum(), live)


@pytest.mark.parametrize("nbg", [False, True])
def test_reference_matches_the_definition(nbg):
    x, w, z = _inputs((2, 3, 12), 4, torch.float64, True)
    y = gated_rms_norm(x, w, z, eps=1e-5, group_size=4, norm_before_gate=nbg, backend="reference")
    assert_close("y", _formula(x, w, z, 1e-5, 4, nbg), y, rel=1e-14)


def test_reference_is_the_layer_norm_module_for_gate_before_norm():
    """The Mamba-2 layer's numbers on CPU do not change: the reference form computes what
    RMSNormGated computes (bitwise, bf16 inputs, gate before the norm)."""
    from ssmkit.layers.norm import RMSNormGated

    x, w, z = _inputs((3, 16), 8, torch.bfloat16, True)
    m = RMSNormGated(16, group_size=8)
    with torch.no_grad():
        m.weight.copy_(w)
    want = m(x, z)
    got = gated_rms_norm(x, w, z, group_size=8, backend="reference")
    assert torch.equal(want, got)


CASES = [  # shape, group_size, with z, gate after the norm
    ((2, 5, 32), 32, True, False),
    ((3, 48), 16, True, True),
    ((4, 40), 10, False, False),
    ((1, 7, 64), 16, True, False),
]


@pytest.mark.triton
@pytest.mark.parametrize("shape,gs,with_z,nbg", CASES)
def test_triton_float64_output_and_grads(shape, gs, with_z, nbg):
    x, w, z = _inputs(shape, gs, torch.float64, with_z, dev=triton_device())
    y = gated_rms_norm(x, w, z, eps=1e-5, group_size=gs, norm_before_gate=nbg, backend="triton")
    want = _formula(x, w, z, 1e-5, gs, nbg)
    assert_close("y", want, y, rel=1e-12)
    names = ["x", "weight", "z"] if with_z else ["x", "weight"]
    for name, a, b in zip(names, _grads(want, (x, w, z)), _grads(y, (x, w, z))):
        assert_close(f"d{name}", a, b, rel=1e-11)


@pytest.mark.triton
@pytest.mark.parametrize("nbg", [False, True])
def test_triton_bf16_and_strided_z(nbg):
    """bf16 x and z, z a slice of a wider projection (row stride > d), bf16 weight: y is the
    float64 value rounded once to bf16 (2^-8 relative, plus the inputs' own rounding, which the
    float64 formula sees too); gradients from float32 arithmetic on the same inputs."""
    dev = triton_device()
    g = torch.Generator().manual_seed(3)
    d, gs = 64, 32
    proj = torch.randn(2, 9, 3 * d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    zz = proj[..., :d]
    assert zz.stride(-2) == 3 * d
    x = torch.randn(2, 9, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dev, torch.bfloat16).requires_grad_()
    y = gated_rms_norm(x, w, zz, group_size=gs, norm_before_gate=nbg, backend="triton")
    assert y.dtype == torch.bfloat16
    want = _formula(x.detach(), w.detach(), zz.detach(), 1e-5, gs, nbg)
    assert_close("y", want, y, rel=8e-3)
    yr = gated_rms_norm(x, w, zz, group_size=gs, norm_before_gate=nbg, backend="reference")
    got = _grads(y, (x, w, proj))
    ref = _grads(yr, (x, w, proj))
    for name, a, b in zip(("x", "weight", "z"), ref, got):
        assert b.dtype == a.dtype
        assert_close(f"d{name}", a, b, rel=2e-2)


@pytest.mark.triton
def test_triton_compiles_fullgraph():
    """The Triton form is one torch.library op with a fake: torch.compile(fullgraph=True) traces
    it, forward and backward."""
    x, w, z = _inputs((2, 3, 16), 8, torch.float64, True, dev=triton_device())

    def f(x, w, z):
        return gated_rms_norm(x, w, z, group_size=8, backend="triton").square().sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, z)
    assert_close("compiled", f(x, w, z), out, rel=1e-12)
    assert_close("compiled dx", torch.autograd.grad(f(x, w, z), x)[0], torch.autograd.grad(out, x)[0], rel=1e-12)


def test_bad_inputs():
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="weight must have shape"):
        gated_rms_norm(x, torch.ones(6))
    with pytest.raises(ValueError, match="group_size must be a positive int dividing d=12"):
        gated_rms_norm(x, torch.ones(12), group_size=5)
    with pytest.raises(ValueError, match="z must have the shape of x"):
        gated_rms_norm(x, torch.ones(12), torch.randn(2, 6))
