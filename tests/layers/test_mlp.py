"""SwiGLU MLP: the formula, mamba_ssm's GatedMLP layout, errors."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.layers import MLP
from ssmkit.testing import assert_close


def test_swiglu_formula_and_layout():
    m = MLP(8, 12).double()
    assert m.fc1.weight.shape == (24, 8) and m.fc2.weight.shape == (8, 12)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    h = x @ m.fc1.weight.T
    ref = (h[..., :12] * F.silu(h[..., 12:])) @ m.fc2.weight.T
    assert_close("y", ref, m(x), rel=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="hidden"):
        MLP(8, 0)
    with pytest.raises(ValueError, match="d_model=8"):
        MLP(8, 4)(torch.randn(2, 7))
    with pytest.raises(TypeError, match="x must"):
        MLP(8, 4)([1.0] * 8)
