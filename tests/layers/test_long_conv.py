"""The layers built on the long-convolution operators (H3 with inner s4d / s6 / hyena, Hyena,
the Mamba block with inner s4d / hyena): FFT form == reference (direct causal sum, sequential scan)
in float64 for outputs, states and gradients; step == forward; state carried across calls; masks
and packed sequences."""

import pytest
import torch

from ssmkit.layers import H3, Hyena, Mamba
from ssmkit.testing import assert_close

D_MODEL, L = 6, 20

# float64: the FFT convolution's rounding is ~ L log L eps relative to the output, far below 1e-10
REL = 1e-10


def _make(kind, backend="auto", seed=0):
    torch.manual_seed(seed)
    if kind == "hyena":
        return Hyena(D_MODEL, l_max=32, filter_cfg={"d_hidden": 8}, backend=backend).double()
    if kind.startswith("mamba-"):
        cfg = {"backend": backend, **({"l_max": 32, "d_hidden": 8} if kind == "mamba-hyena" else {})}
        return Mamba(D_MODEL, d_state=8, expand=1, inner=kind.removeprefix("mamba-"), inner_cfg=cfg,
                     dtype=torch.float64)
    cfg = {"l_max": 32, "d_hidden": 8} if kind == "h3-hyena" else None
    return H3(D_MODEL, 8, inner=kind.removeprefix("h3-"), inner_cfg=cfg, backend=backend).double()


KINDS = ["h3-s4d", "h3-s6", "h3-hyena", "hyena", "mamba-s4d", "mamba-hyena"]


def _state_tensors(st):
    return {k: (v.real if v.is_complex() else v) for k, v in st.tensors().items() if v.is_floating_point() or v.is_complex()}


@pytest.mark.parametrize("kind", KINDS)
def test_fast_form_equals_reference(kind):
    fast, ref = _make(kind, "chunked"), _make(kind, "reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    x_f, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_f, s_f = fast(x_f, return_state=True)
    y_r, s_r = ref(x_r, return_state=True)
    assert_close("y", y_r, y_f, rel=REL)
    for k, v in _state_tensors(s_r).items():
        assert_close(f"state.{k}", v, _state_tensors(s_f)[k], rel=REL, atol=1e-14)
    g = torch.randn_like(y_f)
    (y_f * g).sum().backward()
    (y_r * g).sum().backward()
    assert_close("dx", x_r.grad, x_f.grad, rel=REL)
    for (n, p_f), p_r in zip(fast.named_parameters(), ref.parameters()):
        if p_r.grad is not None or p_f.grad is not None:
            assert_close(f"d{n}", p_r.grad, p_f.grad, rel=REL, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_forward_and_state_carries(kind):
    m = _make(kind)
    x = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    y, st = m(x, return_state=True)
    s = m.allocate_state(2)
    y_step = torch.stack([m.step(x[:, t], s) for t in range(L)], dim=1)
    assert_close("step y", y, y_step, rel=1e-12)
    for k, v in _state_tensors(st).items():
        assert_close(f"step state.{k}", v, _state_tensors(s)[k], rel=1e-12, atol=1e-14)
    y1, s1 = m(x[:, :7], return_state=True)
    y2 = m(x[:, 7:], state=s1)
    assert_close("split y", y, torch.cat([y1, y2], dim=1), rel=1e-12)
    # a prefilled state keeps decoding: step after forward == forward over the whole sequence
    _, s7 = m(x[:, :7], return_state=True)
    y_next = m.step(x[:, 7], s7)
    assert_close("step after prefill", y[:, 7], y_next, rel=1e-12)


@pytest.mark.parametrize("kind", ["h3-s4d", "hyena", "mamba-hyena"])
def test_mask_and_packed(kind):
    m = _make(kind)
    x = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    y, st = m(x, state=m.allocate_state(2), mask=mask, return_state=True)  # a prefill
    assert torch.all(y[1, :5] == 0)
    y1, s1 = m(x[1:, 5:], return_state=True)
    assert_close("masked row", y1[0], y[1, 5:], rel=1e-12)
    for k, v in _state_tensors(s1).items():
        assert_close(f"masked state.{k}", v[0], _state_tensors(st)[k][1], rel=1e-12, atol=1e-14)
    cu = torch.tensor([0, 8, L])
    y_p = m(x[:1], cu_seqlens=cu)
    assert_close("packed", torch.cat([m(x[:1, :8]), m(x[:1, 8:])], dim=1), y_p, rel=1e-12)
