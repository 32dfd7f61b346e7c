"""Mamba-3 layer: mamba_ssm names and init, mixer contract (step, carry, left padding, packing), options."""

import pytest
import torch

from ssmkit.layers import Mamba3, Mamba3State
from ssmkit.layers.mamba3 import heavy_tail
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import assert_close

CONFIGS = [
    dict(d_state=8, headdim=4, chunk_size=4),
    dict(d_state=8, headdim=4, ngroups=2, rope_fraction=1.0, chunk_size=5, is_outproj_norm=True),
    dict(d_state=8, headdim=4, is_mimo=True, mimo_rank=2, chunk_size=3),
    dict(d_state=12, headdim=8, is_mimo=True, mimo_rank=3, rope_fraction=1.0, is_outproj_norm=True, chunk_size=4),
]


def make(cfg, d_model=16, seed=0):
    torch.manual_seed(seed)
    m = Mamba3(d_model, **cfg).double()
    with torch.no_grad():  # non-trivial biases, norms and MIMO weights so every path matters
        for name, p in m.named_parameters():
            if name not in ("in_proj.weight", "out_proj.weight", "dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def test_parameter_names_shapes_and_init_follow_mamba_ssm():
    m = Mamba3(32, d_state=16, headdim=8, ngroups=2, is_mimo=True, mimo_rank=4, is_outproj_norm=True)
    d_inner, H, G, N, R, S = 64, 8, 2, 16, 4, 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * N * G * R + 3 * H + S, 32),  # [z, x, B, C, dt, A, trap, angles]
        "dt_bias": (H,), "B_bias": (H, R, N), "C_bias": (H, R, N), "B_norm.weight": (N,), "C_norm.weight": (N,),
        "mimo_x": (H, R, 8), "mimo_z": (H, R, 8), "mimo_o": (H, R, 8), "D": (H,), "norm.weight": (d_inner,),
        "out_proj.weight": (32, d_inner),
    }
    assert torch.equal(m.B_bias, torch.ones_like(m.B_bias)) and torch.equal(m.mimo_z, torch.ones_like(m.mimo_z))
    assert torch.allclose(m.mimo_x, torch.full_like(m.mimo_x, 0.25))
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    siso = Mamba3(32, d_state=16, headdim=8, rope_fraction=1.0)
    assert siso.num_rope_angles == 8 and siso.B_bias.shape == (8, 1, 16) and not hasattr(siso, "mimo_x")
    a = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.allclose(heavy_tail(a), torch.tensor([0.25, 1 / 1.5, 1.0, 1.5, 3.0]))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_repeated_equals_forward_and_split_carry(cfg):
    m = make(cfg)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y, st = m(x, return_state=True)
    assert isinstance(st, Mamba3State) and st.ssm.shape == (2, m.nheads, m.headdim, m.d_state)
    state = m.allocate_state(2)
    ys = torch.stack([m.step(x[:, t], state) for t in range(11)], 1)
    assert_close("step == forward", y, ys, rel=1e-11)
    for k in ("ssm", "k", "v"):
        assert_close(f"step state {k}", getattr(st, k), getattr(state, k), rel=1e-11)
    assert_close("step angle", torch.cos(st.angle), torch.cos(state.angle), rel=1e-11)
    y1, s1 = m(x[:, :6], return_state=True)
    snapshot = s1.clone()
    y2, s2 = m(x[:, 6:], state=s1, return_state=True)
    assert_close("split and carry", y, torch.cat([y1, y2], 1), rel=1e-11)
    assert_close("carried state", st.ssm, s2.ssm, rel=1e-11)
    for k, v in snapshot.tensors().items():
        assert torch.equal(v, getattr(s1, k)), f"forward modified the input state's {k}"
    with force_backend("reference"):
        assert_close("chunked == reference inside the layer", m(x), y, rel=1e-11)


@pytest.mark.parametrize("cfg", CONFIGS[1:3])
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
        assert_close(f"prompt {i} output", yi, y[i:i + 1, 9 - seq.shape[1]:], rel=1e-11)
        assert_close(f"prompt {i} state", si.ssm, st.ssm[i:i + 1], rel=1e-11)


@pytest.mark.parametrize("cfg", CONFIGS[::2])
def test_packed_equals_separate(cfg):
    m = make(cfg)
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in (3, 7, 1)]
    cu = torch.tensor([0, 3, 10, 11])
    y, st = m(torch.cat(seqs, 1), cu_seqlens=cu, return_state=True)
    for i, s in enumerate(seqs):
        yi, si = m(s, return_state=True)
        assert_close(f"seq {i}", yi, y[:, cu[i]:cu[i + 1]], rel=1e-11)
        assert_close(f"seq {i} state", si.ssm, st.ssm[i:i + 1], rel=1e-11)


def test_bf16_keeps_float32_state_and_gradients_flow():
    m = Mamba3(16, d_state=8, headdim=4, is_mimo=True, mimo_rank=2, is_outproj_norm=True).to(torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    y, st = m(x, return_state=True)
    assert y.dtype == torch.bfloat16 and st.ssm.dtype == torch.float32
    y.float().square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
    assert m.allocate_state(3).ssm.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(16, headdim=8, rope_fraction=0.25)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba3(16, headdim=8, ngroups=3)
    m = Mamba3(16, d_state=8, headdim=4)
    with pytest.raises(ValueError, match="d_model=16"):
        m(torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="Mamba3State"):
        m(torch.randn(1, 3, 16), state=m.allocate_state(1).carry())


def test_step_continues_a_state_returned_with_autograd_on():
    m = Mamba3(16, d_state=8, headdim=4)
    _, st = m(torch.randn(2, 5, 16), return_state=True)
    assert m.step(torch.randn(2, 16), st).shape == (2, 16)


@pytest.mark.parametrize("is_mimo", [False, True])
def test_mamba_ssm_varlen_cases(is_mimo):
    """The cases of mamba_ssm's module-level varlen tests (d_model 128, d_state 64, headdim 64,
    MIMO rank 2, chunk 16; lengths 17 + 25 for the outputs, 19 + 29 + 37 for the backward), in
    float64: packed outputs equal separate runs, and the packed gradients of the input and of
    every parameter equal the separate runs' (upstream checks only that they are finite)."""
    torch.manual_seed(0)
    m = Mamba3(128, d_state=64, expand=2, headdim=64, ngroups=1, is_mimo=is_mimo, mimo_rank=2,
               chunk_size=16, layer_idx=0).double()
    seqs = [torch.randn(1, n, 128, dtype=torch.float64) for n in (17, 25)]
    with torch.no_grad():
        y = m(torch.cat(seqs, 1), cu_seqlens=torch.tensor([0, 17, 42]))
        for i, (s, a) in enumerate(zip(seqs, (0, 17))):
            assert_close(f"seq {i}", m(s), y[:, a:a + s.shape[1]], rel=1e-10)

    lengths = (19, 29, 37)
    x = torch.randn(1, sum(lengths), 128, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 19, 48, 85])
    params = [p for p in m.parameters() if p.requires_grad]
    packed = torch.autograd.grad(m(x, cu_seqlens=cu).sum(), [x, *params])
    sep = [torch.zeros_like(g) for g in packed]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        xi = x.detach()[:, a:b].clone().requires_grad_()
        gi = torch.autograd.grad(m(xi).sum(), [xi, *params])
        sep[0][:, a:b] += gi[0]
        for acc, g in zip(sep[1:], gi[1:]):
            acc += g
    names = ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
    for name, want, got in zip(names, sep, packed):
        assert torch.isfinite(got).all(), name
        assert_close(f"d{name}", want, got, rel=1e-9)
