"""Mamba layer: mamba_ssm parameter names/shapes and initialisation, agreement with Hugging Face's
MambaMixer, the mixer contract (state carry, step == forward, packed sequences, left padding),
use_gate=False, dtypes and errors."""

import math

import pytest
import torch

from ssmkit.layers import LayerState, Mamba, MambaState
from ssmkit.testing import assert_close


def layer(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = Mamba(8, d_state=5, d_conv=4, expand=2, dtype=dtype, **kw)
    with torch.no_grad():  # make every parameter non-trivial so mistakes show up
        m.D.normal_()
        m.conv1d.bias.normal_()
        m.A_log.add_(0.1 * torch.randn_like(m.A_log))
    return m


def test_parameter_names_shapes_and_init():
    m = Mamba(64, d_state=16, d_conv=4, expand=2, dt_min=0.001, dt_max=0.1)
    d_inner, r = 128, math.ceil(64 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 64),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (r + 32, d_inner),
        "dt_proj.weight": (d_inner, r),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, 16),
        "D": (d_inner,),
        "out_proj.weight": (64, d_inner),
    }
    # S4D-real A = -(1..N) for every channel; D = 1; Δ = softplus(bias) log-uniform in [dt_min, dt_max].
    assert_close("A", -torch.arange(1, 17.0).repeat(d_inner, 1), m._A(), 1e-7)
    assert torch.equal(m.D.data, torch.ones(d_inner))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.dt_proj.weight.abs().max() <= r**-0.5
    assert m.A_log.dtype == torch.float32
    m2 = Mamba(64, use_gate=False, bias=True, conv_bias=False, dt_rank=7)
    assert m2.in_proj.weight.shape == (d_inner, 64) and m2.in_proj.bias is not None
    assert m2.conv1d.bias is None and m2.dt_proj.weight.shape == (d_inner, 7)


@pytest.mark.peer
def test_matches_huggingface_mamba_mixer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = transformers.MambaConfig(hidden_size=16, state_size=6, expand=2, conv_kernel=4, time_step_rank=3,
                                   use_bias=False, use_conv_bias=True, use_mambapy=False)
    torch.manual_seed(0)
    ours = Mamba(16, d_state=6, d_conv=4, expand=2, dt_rank=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = MambaMixer(cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        assert_close("y", hf(x), ours(x), 1e-5)


@pytest.mark.parametrize("gate", [True, False])
def test_state_carry_equals_one_pass(gate):
    m = layer(use_gate=gate)
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    y, s = m(x, return_state=True)
    assert isinstance(s, MambaState) and isinstance(s, LayerState)
    assert s.ssm_state.shape == (2, 16, 5) and s.conv_state.shape == (2, 16, 3)
    for cut in (1, 2, 7, 18):
        y1, s1 = m(x[:, :cut], return_state=True)
        s1_copy = s1.clone()
        y2, s2 = m(x[:, cut:], state=s1, return_state=True)
        assert_close("state not modified", s1_copy.ssm_state, s1.ssm_state, 0.0)
        assert_close(f"y cut {cut}", y, torch.cat([y1, y2], 1), 1e-12)
        assert_close(f"ssm_state cut {cut}", s.ssm_state, s2.ssm_state, 1e-12)
        assert_close(f"conv_state cut {cut}", s.conv_state, s2.conv_state, 1e-12)


def test_step_equals_forward():
    m = layer()
    x = torch.randn(3, 12, 8, dtype=torch.float64)
    y, s = m(x, return_state=True)
    st = m.allocate_state(3)
    assert st.ssm_state.dtype == torch.float64
    ys = torch.stack([m.step(x[:, t], st) for t in range(12)], 1)
    assert_close("y", y, ys, 1e-12)
    assert_close("ssm_state", s.ssm_state, st.ssm_state, 1e-12)
    assert_close("conv_state", s.conv_state, st.conv_state, 1e-12)


def test_step_after_prefill_float32():
    m = layer(dtype=torch.float32)
    x = torch.randn(2, 40, 8)
    y = m(x)
    _, s = m(x[:, :25], return_state=True)
    assert s.ssm_state.dtype == torch.float32
    ys = torch.stack([m.step(x[:, t], s) for t in range(25, 40)], 1)
    assert_close("y", y[:, 25:], ys, 1e-5)


def test_packed_equals_separate():
    m = layer()
    lens = [5, 1, 9, 3]
    xs = [torch.randn(1, n, 8, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    y, s = m(torch.cat(xs, 1), cu_seqlens=cu, return_state=True)
    for i, xi in enumerate(xs):
        yi, si = m(xi, return_state=True)
        assert_close(f"y{i}", yi, y[:, cu[i] : cu[i + 1]], 1e-12)
        assert_close(f"ssm{i}", si.ssm_state, s.ssm_state[i : i + 1], 1e-12)
        assert_close(f"conv{i}", si.conv_state, s.conv_state[i : i + 1], 1e-12)


def test_left_padding_equals_alone():
    m = layer()
    a = torch.randn(1, 7, 8, dtype=torch.float64)
    b = torch.randn(1, 4, 8, dtype=torch.float64)
    batch = torch.cat([a, torch.cat([torch.randn(1, 3, 8, dtype=torch.float64), b], 1)], 0)
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    y, s = m(batch, mask=mask, return_state=True)
    for i, xi in enumerate((a, b)):
        yi, si = m(xi, return_state=True)
        assert_close(f"y{i}", yi, y[i : i + 1, 7 - xi.shape[1] :], 1e-12)
        assert_close(f"ssm{i}", si.ssm_state, s.ssm_state[i : i + 1], 1e-12)
        assert_close(f"conv{i}", si.conv_state, s.conv_state[i : i + 1], 1e-12)
    # decoding continues identically from the padded batch's state
    t = torch.randn(2, 8, dtype=torch.float64)
    yb = m.step(t, s)
    for i, xi in enumerate((a, b)):
        _, si = m(xi, return_state=True)
        assert_close(f"step{i}", m.step(t[i : i + 1], si), yb[i : i + 1], 1e-12)


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=pytest.mark.triton)])
def test_gradients_flow_and_match_reference_backend(backend):
    """Every gradient of the layer against its reference form; with ``triton`` (the Triton
    interpreter on CPU), the layer runs the scan as a torch.library op whose backward reads the
    states the forward saved (d_state 5: one lane per channel in the split-state kernels)."""
    from ssmkit.ops.dispatch import force_backend

    m = layer()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for be in ("reference", backend):
        m.zero_grad()
        with force_backend(be):
            out = m(x)
        gx, = torch.autograd.grad(out.pow(2).sum(), x, retain_graph=True)
        out.pow(2).sum().backward()
        grads[be] = [gx] + [p.grad.clone() for p in m.parameters()]
    # (the Triton causal conv computes in float32 even for float64 inputs: 1e-6)
    rel = 1e-10 if backend == "chunked" else 1e-6
    for i, (a, b) in enumerate(zip(grads["reference"], grads[backend])):
        assert_close(f"grad {i}", a, b, rel)
    assert all(g.abs().sum() > 0 for g in grads[backend])


def test_bfloat16_runs_with_float32_state():
    m = Mamba(8, d_state=4, dtype=torch.bfloat16)
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    y, s = m(x, return_state=True)
    assert y.dtype == torch.bfloat16 and s.ssm_state.dtype == torch.float32
    assert s.conv_state.dtype == torch.bfloat16
    st = m.allocate_state(2)
    assert st.ssm_state.dtype == torch.float32
    assert m.step(x[:, 0], st).dtype == torch.bfloat16


def test_bad_inputs():
    m = layer(dtype=torch.float32)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(5, 8))
    with pytest.raises(TypeError, match="state"):
        m(torch.randn(2, 5, 8), state=(1, 2))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 5, 8), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="either"):
        m(torch.randn(1, 5, 8), mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="d_model"):
        Mamba(0)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(8, dt_init="nope")
