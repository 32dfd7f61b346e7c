"""MLP: SwiGLU (mamba_ssm's GatedMLP layout) and squared ReLU, the MLP as a block's mixer, errors."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import MLP
from ssmkit.layers.mlp import FeedForward, FeedForwardState
from ssmkit.testing import assert_close


def test_swiglu_formula_and_layout():
    m = MLP(8, 12).double()
    assert m.fc1.weight.shape == (24, 8) and m.fc2.weight.shape == (8, 12)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    h = x @ m.fc1.weight.T
    ref = (h[..., :12] * F.silu(h[..., 12:])) @ m.fc2.weight.T
    assert_close("y", ref, m(x), rel=1e-12)


def test_relu2_formula_and_layout():
    m = MLP(8, 12, activation="relu2", bias=True).double()
    assert m.fc1.weight.shape == (12, 8) and m.fc2.weight.shape == (8, 12)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    ref = F.relu(x @ m.fc1.weight.T + m.fc1.bias).square() @ m.fc2.weight.T + m.fc2.bias
    assert_close("y", ref, m(x), rel=1e-12)


def test_feed_forward_mixer_contract():
    m = FeedForward(8, 12, activation="relu2").double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    state = m.allocate_state(2)
    assert state.tensors() == {} and state.nbytes() == 0
    y, new = m(x, state=state, return_state=True, mask=torch.ones(2, 5, dtype=torch.bool))
    assert isinstance(new, FeedForwardState)
    assert_close("step", y[:, 3], m.step(x[:, 3], state), rel=1e-12)
    with pytest.raises(TypeError, match="FeedForwardState"):
        m(x, state=object())


def test_errors():
    with pytest.raises(ValueError, match="activation"):
        MLP(8, 4, activation="gelu")
    with pytest.raises(ValueError, match="hidden"):
        MLP(8, 0)
    with pytest.raises(ValueError, match="d_model=8"):
        MLP(8, 4)(torch.randn(2, 7))
    with pytest.raises(TypeError, match="x must"):
        MLP(8, 4)([1.0] * 8)
