"""Mamba-2 layer: mamba_ssm names, mixer contract (step, carry, left padding, packing), HF parity."""

import math

import pytest
import torch

from ssmkit.layers import Mamba2, Mamba2State
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import assert_close
from tests.peers import hf_mamba2_norm_per_group, hf_mamba2_norm_skip_reason

CONFIGS = [
    dict(d_state=8, headdim=4, ngroups=1, chunk_size=4),
    dict(d_state=6, headdim=4, ngroups=2, chunk_size=5, D_has_hdim=True, dt_limit=(0.01, 0.5)),
    dict(d_state=4, headdim=8, ngroups=1, chunk_size=3, rmsnorm=False),
    dict(d_state=4, headdim=4, ngroups=4, chunk_size=8, norm_before_gate=True, bias=True),
]


def make(cfg, d_model=16, seed=0):
    torch.manual_seed(seed)
    m = Mamba2(d_model, **cfg).double()
    with torch.no_grad():  # non-trivial conv bias / D so every path matters
        m.conv1d.bias.normal_()
        m.D.normal_()
    return m


def test_parameter_names_and_shapes_follow_mamba_ssm():
    m = Mamba2(32, d_state=16, headdim=8, ngroups=2, expand=2)
    d_inner, H, G, N = 64, 8, 2, 16
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * G * N + H, 32),  # [z, x, B, C, dt]
        "conv1d.weight": (d_inner + 2 * G * N, 1, 4), "conv1d.bias": (d_inner + 2 * G * N,),
        "dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (d_inner,), "out_proj.weight": (32, d_inner),
    }
    A = torch.exp(m.A_log)
    assert (A >= 1).all() and (A <= 16).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert Mamba2(32, headdim=8, D_has_hdim=True).D.shape == (64,)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_repeated_equals_forward_and_split_carry(cfg):
    m = make(cfg)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y, st = m(x, return_state=True)
    assert all(t.is_contiguous() for t in st.tensors().values()), "returned state must be contiguous"
    assert isinstance(st, Mamba2State) and st.ssm_state.shape == (2, m.nheads, m.headdim, m.d_state)
    state = m.allocate_state(2)
    ys = torch.stack([m.step(x[:, t], state) for t in range(11)], 1)
    assert_close("step == forward", y, ys, rel=1e-11)
    assert_close("step state", st.ssm_state, state.ssm_state, rel=1e-11)
    assert_close("conv state", st.conv_state, state.conv_state, rel=1e-12)
    y1, s1 = m(x[:, :6], return_state=True)
    snapshot = s1.clone()
    y2, s2 = m(x[:, 6:], state=s1, return_state=True)
    assert_close("split and carry", y, torch.cat([y1, y2], 1), rel=1e-11)
    assert_close("carried state", st.ssm_state, s2.ssm_state, rel=1e-11)
    for k, v in snapshot.tensors().items():
        assert torch.equal(v, getattr(s1, k)), f"forward modified the input state's {k}"
    with force_backend("reference"):
        assert_close("chunked == reference inside the layer", m(x), y, rel=1e-11)


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_left_padding_equals_alone(cfg):
    m = make(cfg)
    a = torch.randn(1, 5, 16, dtype=torch.float64)
    b = torch.randn(1, 9, 16, dtype=torch.float64)
    x = torch.cat([torch.cat([torch.randn(1, 4, 16, dtype=torch.float64), a], 1), b])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    y, st = m(x, mask=mask, return_state=True)
    for i, seq in enumerate((a, b)):
        yi, si = m(seq, return_state=True)
        assert_close(f"prompt {i} output", yi, y[i : i + 1, 9 - seq.shape[1]:], rel=1e-11)
        assert_close(f"prompt {i} ssm state", si.ssm_state, st.ssm_state[i : i + 1], rel=1e-11)
        assert_close(f"prompt {i} conv state", si.conv_state, st.conv_state[i : i + 1], rel=1e-12)
    # decoding continues identically from the batched state
    t = torch.randn(2, 16, dtype=torch.float64)
    yb = m.step(t, st)
    _, sa = m(a, return_state=True)
    assert_close("decode after padded prefill", m.step(t[:1], sa), yb[:1], rel=1e-11)


def test_packed_equals_separate():
    m = make(CONFIGS[1])
    lens = [3, 7, 1, 5]
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64)
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    y, st = m(x, cu_seqlens=cu, return_state=True)
    for i in range(4):
        a, e = cu[i].item(), cu[i + 1].item()
        yi, si = m(x[:, a:e], return_state=True)
        assert_close(f"sequence {i}", yi, y[:, a:e], rel=1e-11)
        assert_close(f"state {i}", si.ssm_state, st.ssm_state[i : i + 1], rel=1e-11)
        assert_close(f"conv state {i}", si.conv_state, st.conv_state[i : i + 1], rel=1e-12)


def test_half_precision_keeps_float32_ssm_state_and_gradients_flow():
    m = Mamba2(16, d_state=4, headdim=4, chunk_size=4)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = m(x)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    mb = Mamba2(16, d_state=4, headdim=4, chunk_size=4, dtype=torch.bfloat16)
    yb, st = mb(x.detach().bfloat16(), return_state=True)
    assert yb.dtype == torch.bfloat16 and st.ssm_state.dtype == torch.float32
    assert mb.allocate_state(1).ssm_state.dtype == torch.float32


@pytest.mark.peer
def test_matches_hugging_face_mamba2_mixer():
    transformers = pytest.importorskip("transformers")
    if hf_mamba2_norm_per_group() is False:  # ngroups=2 below
        pytest.skip(hf_mamba2_norm_skip_reason())
    cfg = transformers.Mamba2Config(hidden_size=16, num_heads=8, head_dim=4, state_size=6, n_groups=2, expand=2,
                                    chunk_size=4, num_hidden_layers=1, vocab_size=8, layer_norm_epsilon=1e-5)
    ours = make(dict(d_state=6, headdim=4, ngroups=2, chunk_size=4))
    hf = transformers.Mamba2Model(cfg).layers[0].mixer.double().eval()
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    with torch.no_grad():  # HF's torch path computes the scan in float32
        assert_close("HF Mamba2Mixer", hf(x), ours(x), rel=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by headdim"):
        Mamba2(16, headdim=5)
    with pytest.raises(ValueError, match="ngroups=3 must divide"):
        Mamba2(16, headdim=4, ngroups=3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        Mamba2(16, headdim=4, chunk_size=0)
    m = Mamba2(16, d_state=4, headdim=4)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seqlen, d_model=16\)"):
        m(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        m(torch.randn(1, 3, 16), mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="not both"):
        m(torch.randn(1, 3, 16), mask=torch.ones(1, 3), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="state must be a Mamba2State"):
        m(torch.randn(1, 3, 16), state=(torch.zeros(1),))
    assert math.isinf(m.dt_limit[1])
