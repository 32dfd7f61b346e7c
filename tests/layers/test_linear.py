"""ssmkit.layers.Linear: an nn.Linear (same initialisation, state dict and gradients) whose float32
CPU inference runs ssmkit.ops.cpu_linear."""

import pytest
import torch
from torch import nn

from ssmkit.layers.linear import Linear
from ssmkit.ops import cpu_linear
from ssmkit.ops.cpu_compile import compiler_available
from ssmkit.testing import matmul_error_bound


def test_same_parameters_and_state_dict_as_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(12, 5)
    torch.manual_seed(0)
    lin = Linear(12, 5)
    assert isinstance(lin, nn.Linear)
    assert lin.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(lin.state_dict()[k], v)
    other = nn.Linear(12, 5)
    other.load_state_dict(lin.state_dict())
    Linear(12, 5).load_state_dict(other.state_dict())


def test_training_matches_nn_linear_exactly():
    torch.manual_seed(1)
    ref = nn.Linear(16, 8)
    lin = Linear(16, 8)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16)
    ref(x).square().sum().backward()
    lin(x).square().sum().backward()
    for a, b in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_inference_within_float32_rounding_of_nn_linear(onednn_calls):
    torch.manual_seed(2)
    lin = Linear(64, 24)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = lin(x)
    assert onednn_calls[0] == (1 if cpu_linear.fast_form_available() else 0)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    tol = matmul_error_bound(x, lin.weight, torch.float32) + 2 * torch.finfo(torch.float32).eps * exact.abs()
    assert ((y.double() - exact).abs() <= tol).all()


@pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler for Inductor")
def test_under_torch_compile_runs_f_linear():
    """Inductor lowers F.linear itself (its lowering of oneDNN's op expects packed weights)."""
    cpu_linear.fast_form_available()
    torch.manual_seed(3)
    lin = Linear(32, 16)
    x = torch.randn(4, 32)
    compiled = torch.compile(lambda t: lin(t), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
