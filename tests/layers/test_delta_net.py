"""DeltaNet / GatedDeltaNet layers: mixer contract (step, carry, left padding, packing), errors."""

import pytest
import torch

from ssmkit.layers import DeltaNet, DeltaNetState, GatedDeltaNet
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import assert_close

CASES = [
    (DeltaNet, dict(num_heads=2, chunk_size=4)),
    (DeltaNet, dict(num_heads=4, head_dim=3, expand_v=2.0, chunk_size=5, use_output_gate=False, conv_bias=True)),
    (GatedDeltaNet, dict(num_heads=2, chunk_size=4)),
    (GatedDeltaNet, dict(num_heads=2, num_v_heads=4, head_dim=4, expand_v=1.5, chunk_size=4)),  # Qwen3-Next
]


def make(cls, kw, seed=0):
    torch.manual_seed(seed)
    return cls(16, **kw).double()


@pytest.mark.parametrize("cls,kw", CASES)
def test_step_repeated_equals_forward_and_split_carry(cls, kw):
    m = make(cls, kw)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y, st = m(x, return_state=True)
    assert all(t.is_contiguous() for t in st.tensors().values()), "returned state must be contiguous"
    assert isinstance(st, DeltaNetState)
    assert st.ssm_state.shape == (2, m.num_v_heads, m.head_k_dim, m.head_v_dim)
    state = m.allocate_state(2)
    ptrs = {k: t.data_ptr() for k, t in state.tensors().items()}
    ys = torch.stack([m.step(x[:, t], state) for t in range(11)], 1)  # (autograd on: the device path)
    assert {k: t.data_ptr() for k, t in state.tensors().items()} == ptrs, "step must update the state in place"
    assert_close("step == forward", y, ys, rel=1e-11)
    assert_close("step state", st.ssm_state, state.ssm_state, rel=1e-11)
    y1, s1 = m(x[:, :7], return_state=True)
    snapshot = s1.clone()
    y2, s2 = m(x[:, 7:], state=s1, return_state=True)
    assert_close("split and carry", y, torch.cat([y1, y2], 1), rel=1e-11)
    assert_close("carried state", st.ssm_state, s2.ssm_state, rel=1e-11)
    for k, v in snapshot.tensors().items():
        assert torch.equal(v, getattr(s1, k)), f"forward modified the input state's {k}"
    with force_backend("reference"):
        assert_close("chunked == reference inside the layer", m(x), y, rel=1e-11)


@pytest.mark.parametrize("cls,kw", [CASES[0], CASES[2], CASES[3]])
def test_left_padding_equals_alone(cls, kw):
    m = make(cls, kw)
    a = torch.randn(1, 4, 16, dtype=torch.float64)
    b = torch.randn(1, 9, 16, dtype=torch.float64)
    x = torch.cat([torch.cat([torch.randn(1, 5, 16, dtype=torch.float64), a], 1), b])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :5] = False
    y, st = m(x, mask=mask, return_state=True)
    for i, seq in enumerate((a, b)):
        yi, si = m(seq, return_state=True)
        assert_close(f"prompt {i} output", yi, y[i : i + 1, 9 - seq.shape[1]:], rel=1e-11)
        assert_close(f"prompt {i} state", si.ssm_state, st.ssm_state[i : i + 1], rel=1e-11)
        assert_close(f"prompt {i} conv state", si.conv_state, st.conv_state[i : i + 1], rel=1e-12)


@pytest.mark.parametrize("cls,kw", [CASES[1], CASES[2]])
def test_packed_equals_separate(cls, kw):
    m = make(cls, kw)
    cu = torch.tensor([0, 6, 7, 13])
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    y, st = m(x, cu_seqlens=cu, return_state=True)
    for i in range(3):
        a, e = cu[i].item(), cu[i + 1].item()
        yi, si = m(x[:, a:e], return_state=True)
        assert_close(f"sequence {i}", yi, y[:, a:e], rel=1e-11)
        assert_close(f"state {i}", si.ssm_state, st.ssm_state[i : i + 1], rel=1e-11)


def test_gated_parameters_and_float32_state():
    m = GatedDeltaNet(16, num_heads=2)
    names = set(dict(m.named_parameters()))
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight", "a_proj.weight", "A_log", "dt_bias",
            "conv1d.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight"} <= names
    assert m.head_v_dim == 2 * m.head_k_dim
    assert "a_proj.weight" not in dict(DeltaNet(16, num_heads=2).named_parameters())
    x = torch.randn(1, 6, 16, requires_grad=True)
    m(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    mb = GatedDeltaNet(16, num_heads=2, dtype=torch.bfloat16)
    yb, st = mb(x.detach().bfloat16(), return_state=True)
    assert yb.dtype == torch.bfloat16 and st.ssm_state.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        DeltaNet(16, num_heads=0)
    with pytest.raises(ValueError, match="head_dim \\* expand_v must be a positive integer"):
        DeltaNet(16, num_heads=2, expand_v=0.3)
    m = DeltaNet(16, num_heads=2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seqlen, d_model=16\)"):
        m(torch.randn(1, 3, 12))
    with pytest.raises(TypeError, match="state must be a DeltaNetState"):
        m(torch.randn(1, 3, 16), state=GatedDeltaNet(16, num_heads=2).allocate_state(1).ssm_state)


def test_more_value_heads_share_their_query_key_head():
    """num_v_heads = r * num_heads: value head j reads query/key head j // r (as r key-head copies would)."""
    m = make(GatedDeltaNet, CASES[3][1])
    assert (m.b_proj.out_features, m.A_log.shape[0], m.v_proj.out_features) == (4, 4, 4 * 6)
    wide = GatedDeltaNet(16, num_heads=4, head_dim=4, expand_v=1.5, chunk_size=4).double()
    with torch.no_grad():
        for name, p in wide.named_parameters():
            src = m.get_parameter(name)
            if name in ("q_proj.weight", "k_proj.weight"):
                src = src.unflatten(0, (2, 4)).repeat_interleave(2, 0).flatten(0, 1)
            elif name == "conv1d.weight":
                q, k, v = src.split([8, 8, 24])
                src = torch.cat([t.unflatten(0, (2, 4)).repeat_interleave(2, 0).flatten(0, 1) for t in (q, k)] + [v])
            p.copy_(src)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert_close("grouped == repeated heads", wide(x), m(x), rel=1e-11)
    with pytest.raises(ValueError, match="num_v_heads=3"):
        GatedDeltaNet(16, num_heads=2, num_v_heads=3)
