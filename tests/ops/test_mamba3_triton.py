"""The Triton Mamba-3 decode step (``backend="triton"``) against the reference, under the Triton
CPU interpreter when there is no GPU: outputs and every part of the state, in float64, SISO and
MIMO, both rotary layouts, grouped B/C, T = 1 and T > 1 tokens, with and without biases."""

import math

import pytest
import torch

from ssmkit.ops.mamba3 import Mamba3Carry, mamba3, mamba3_step
from ssmkit.testing import assert_close, triton_device
from tests.ops.test_mamba3 import CASES, make_inputs

pytestmark = pytest.mark.triton
pytest.importorskip("triton")


@pytest.mark.parametrize("r,pairs,g", CASES)
@pytest.mark.parametrize("T", [1, 4])
def test_triton_step_matches_reference(r, pairs, g, T):
    dev = triton_device()
    inp, kw, st = make_inputs(2, T, g=g, r=r, n=12, s=3)
    if T == 1:
        kw.update(B_bias=None, z=None, mimo_z=None)
    inp = {k: v.to(dev) for k, v in inp.items()}
    kw = {k: None if v is None else v.to(dev) for k, v in kw.items()}
    st = Mamba3Carry(*(t.to(dev) for t in st))
    ref, ref_st = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, return_final_state=True,
                         backend="reference")
    state = Mamba3Carry(*(t.clone() for t in st))
    y = mamba3_step(state, **inp, **kw, rotary_pairs=pairs, backend="triton")
    assert_close("y", ref, y, 1e-12)
    for f in ("ssm", "k", "v"):
        assert_close(f, getattr(ref_st, f), getattr(state, f), 1e-12)
    d = torch.remainder(state.angle - ref_st.angle + math.pi, 2 * math.pi) - math.pi
    assert d.abs().max().item() <= 1e-12
