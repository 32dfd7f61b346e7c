"""MoE: top-k routing == per-token loop, dense == sparse dispatch, balance loss, gradients, errors."""

import pytest
import torch

from ssmkit.layers import MoE
from ssmkit.testing import assert_close


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(moe.router(x[t]), -1)
        w, idx = p.topk(moe.top_k)
        w = w / w.sum()
        for wi, e in zip(w, idx):
            out[t] += wi * moe.experts[int(e)](x[t])
    return out


def test_matches_per_token_loop_and_dense_dispatch():
    moe = MoE(8, 16, n_experts=4, top_k=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y, aux = moe(x)
    assert_close("sparse", loop_reference(moe, x.reshape(-1, 8)).reshape(2, 6, 8), y, rel=1e-12)
    yd, auxd = moe(x, dense=True)
    assert_close("dense", y, yd, rel=1e-12)
    assert torch.allclose(aux, auxd)


def test_balance_loss_is_one_for_uniform_router_and_masks_padding():
    moe = MoE(8, 16, n_experts=4, top_k=2)
    torch.nn.init.zeros_(moe.router.weight)
    _, aux = moe(torch.randn(5, 8))
    assert abs(aux.item() - 1.0) < 1e-6
    moe2 = MoE(8, 16, n_experts=4, top_k=1)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    _, a1 = moe2(x, mask=mask)
    _, a2 = moe2(x[:, 2:])
    assert_close("masked aux", a2, a1, rel=1e-6)


def test_gradients_reach_router_and_experts():
    moe = MoE(8, 16, n_experts=4, top_k=2)
    y, aux = moe(torch.randn(10, 8))
    (y.square().sum() + aux).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert sum(int(e.fc1.weight.grad is not None) for e in moe.experts) >= 2


def test_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 16, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="d_model=8"):
        MoE(8, 16)(torch.randn(3, 4))


def test_shared_expert_is_added_to_every_token_and_experts_take_the_activation():
    moe = MoE(8, 16, n_experts=4, top_k=2, d_shared=12, activation="relu2").double()
    assert moe.shared.fc1.weight.shape == (12, 8) and moe.experts[0].fc1.weight.shape == (16, 8)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y, _ = moe(x)
    ref = loop_reference(moe, x.reshape(-1, 8)).reshape(2, 6, 8) + moe.shared(x)
    assert_close("shared", ref, y, rel=1e-12)
    assert_close("dense", y, moe(x, dense=True)[0], rel=1e-12)
    with pytest.raises(ValueError, match="d_shared"):
        MoE(8, 16, d_shared=-1)


def test_shared_gate_weights_the_shared_expert_per_token():
    moe = MoE(8, 16, n_experts=4, top_k=2, d_shared=12, shared_gate=True).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    ref = loop_reference(moe, x.reshape(-1, 8)).reshape(2, 6, 8) + torch.sigmoid(moe.shared_gate(x)) * moe.shared(x)
    assert_close("gated shared", ref, moe(x)[0], rel=1e-12)
    assert_close("dense", moe(x)[0], moe(x, dense=True)[0], rel=1e-12)
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(8, 16, shared_gate=True)
