"""``norm_linear`` (GEMV with an optional residual add + RMSNorm prologue): the Triton form under
the CPU interpreter against the PyTorch reference, in float64 and with the bf16 roundings of a
model; argument validation."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

gt = pytest.importorskip("ssmkit.ops.fused.gemv")


@pytest.mark.parametrize("rows,N,K,norm,res,shape", [
    (1, 37, 100, True, True, None),        # K not a multiple of the block, N not either
    (3, 64, 128, False, False, (16, 32, 4)),
    (2, 9, 300, True, False, (4, 128, 4)),  # norm without a residual (the first block)
    (1, 50, 64, True, True, (8, 1024, 4)),  # one K tile wider than K
    (1, 70, 4096, False, False, None),      # the K >= 4096 launch rule
])
def test_matches_reference_float64(rows, N, K, norm, res, shape, monkeypatch):
    dev = triton_device()
    if shape:
        monkeypatch.setattr(gt, "GEMV", dict(block_n=shape[0], block_k=shape[1], num_warps=shape[2]))
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(rows, K, generator=g, dtype=torch.float64).to(dev)
    w = torch.randn(N, K, generator=g, dtype=torch.float64).to(dev)
    r = torch.randn(rows, K, generator=g, dtype=torch.float64).to(dev) if res else None
    nw = torch.rand(K, generator=g, dtype=torch.float64).to(dev) + 0.5 if norm else None
    y_ref, r_ref = gt.norm_linear_reference(x, w, nw, r, 1e-5, None)
    y, r_out = gt.norm_linear_triton(x, w, nw, r, 1e-5, None)
    assert_close("y", y_ref, y, rel=1e-12)
    if norm:
        assert_close("residual", r_ref, r_out, rel=1e-15)
    else:
        assert r_out is None


def test_bf16_model_roundings():
    """bf16 branch output + float32 residual -> float32 residual, bf16 norm output, bf16 GEMV:
    the same roundings as add_rms_norm followed by F.linear (float32 sums in another order)."""
    dev = triton_device()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, generator=g).to(dev, torch.bfloat16)
    r = torch.randn(1, 256, generator=g).to(dev)
    w = (torch.randn(96, 256, generator=g) * 0.05).to(dev, torch.bfloat16)
    nw = (torch.rand(256, generator=g) + 0.5).to(dev, torch.bfloat16)
    y_ref, r_ref = gt.norm_linear_reference(x, w, nw, r, 1e-5, torch.float32)
    y, r_out = gt.norm_linear_triton(x, w, nw, r, 1e-5, torch.float32)
    assert r_out.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(r_out, r_ref)
    assert_close("y", y_ref.float(), y.float(), rel=1e-2)


def test_public_function_dispatch_and_checks():
    x = torch.randn(2, 8)
    w = torch.randn(5, 8)
    y, r = gt.norm_linear(x, w)  # CPU: the reference form
    assert r is None and torch.allclose(y, x @ w.t())
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        gt.norm_linear(torch.randn(8), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, K=8\)"):
        gt.norm_linear(x, torch.randn(5, 7))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        gt.norm_linear(x, w, torch.ones(7))
    with pytest.raises(ValueError, match="residual needs norm_weight"):
        gt.norm_linear(x, w, residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        gt.norm_linear(x, w, torch.ones(8), torch.randn(3, 8))
    # autograd falls back to the differentiable reference
    xg = x.clone().requires_grad_()
    y, _ = gt.norm_linear(xg, w, torch.ones(8), backend="auto")
    y.sum().backward()
    assert xg.grad is not None
