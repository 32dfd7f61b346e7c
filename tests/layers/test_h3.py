"""H3 and Hyena reject bad input with an error naming the argument (their forms, states and
steps are tested in test_long_conv.py)."""

import pytest
import torch

from ssmkit.layers import H3, H3State, Hyena, HyenaState, Mamba

D_MODEL = 6


def test_bad_input_named():
    m = H3(D_MODEL, 8)
    with pytest.raises(ValueError, match="inner"):
        H3(D_MODEL, 8, inner="s5")
    with pytest.raises(ValueError, match="backend"):
        Hyena(D_MODEL, backend="cuda")
    with pytest.raises(ValueError, match="inner"):
        Mamba(D_MODEL, inner="s5")
    with pytest.raises(ValueError, match="d_state"):
        H3(D_MODEL, 7)
    with pytest.raises(ValueError, match="order"):
        Hyena(D_MODEL, order=0)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(2, 5, D_MODEL), m.allocate_state(2))
    with pytest.raises(ValueError, match="x_t"):
        m.step(torch.randn(3, D_MODEL), m.allocate_state(2))
    with pytest.raises(ValueError, match="x_t"):
        Hyena(D_MODEL, l_max=8).step(torch.randn(3, D_MODEL), Hyena(D_MODEL, l_max=8).allocate_state(2))
    with pytest.raises(TypeError, match="state"):
        m(torch.randn(2, 5, D_MODEL), state=Hyena(D_MODEL, l_max=8).allocate_state(2))
    hy = Hyena(D_MODEL, l_max=8)
    with pytest.raises(ValueError, match="l_max"):
        hy(torch.randn(1, 9, D_MODEL))
    st = hy.allocate_state(1, max_seqlen=2)
    hy.step(torch.randn(1, D_MODEL), st)
    hy.step(torch.randn(1, D_MODEL), st)
    with pytest.raises(ValueError, match="full"):
        hy.step(torch.randn(1, D_MODEL), st)
    assert isinstance(m.allocate_state(1), H3State) and isinstance(hy.allocate_state(1), HyenaState)
