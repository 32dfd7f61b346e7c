"""The Mamba layer on CUDA (Triton scan reading z, B, C as views of the projections; the
sequence-parallel path at batch 1) against the same layer in float64 on the CPU (marked ``gpu``)."""

import copy

import pytest
import torch

from ssmkit.layers.mamba import Mamba
from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


@pytest.mark.parametrize("bsz,L", [(1, 3000), (4, 257)])  # batch 1: split into segments
def test_layer_forward_backward_matches_cpu_float64(bsz, L):
    torch.manual_seed(0)
    layer = Mamba(64, d_state=16, device="cuda", dtype=torch.float32)
    ref = copy.deepcopy(layer).to("cpu", torch.float64)
    x = torch.randn(bsz, L, 64, device="cuda", requires_grad=True)
    x64 = x.detach().cpu().double().requires_grad_()
    y = layer(x)
    y64 = ref(x64)
    assert rel_err(y64, y.detach().cpu().double()) <= 1e-4
    gy = torch.randn_like(y64)
    y.backward(gy.to(y))
    y64.backward(gy)
    assert rel_err(x64.grad, x.grad.cpu().double()) <= 1e-4
    for (name, p), (_, p64) in zip(layer.named_parameters(), ref.named_parameters()):
        assert rel_err(p64.grad, p.grad.cpu().double()) <= 1e-3, name
