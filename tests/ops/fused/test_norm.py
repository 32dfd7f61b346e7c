"""Fused residual add + RMSNorm (ssmkit.ops.fused.norm): the Triton form under the interpreter
against a float64 reference and against the unfused PyTorch form, dtypes and strides."""

import pytest
import torch

from ssmkit.ops.fused.norm import add_rms_norm, add_rms_norm_reference
from ssmkit.testing import assert_close, triton_device


def _ref64(x, residual, weight, eps):
    h = x.double() if residual is None else residual.double() + x.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), h


@pytest.mark.triton
@pytest.mark.parametrize("shape,with_res", [((3, 48), True), ((2, 5, 100), False), ((1, 2048), True)])
def test_triton_matches_float64(shape, with_res):
    dev = triton_device()
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).to(dev)
    r = torch.randn(*shape, generator=g).to(dev) if with_res else None
    w = torch.randn(shape[-1], generator=g).to(dev)
    y, h = add_rms_norm(x, r, w, eps=1e-5, backend="triton")
    yr, hr = _ref64(x, r, w, 1e-5)
    assert y.dtype == torch.float32 and h.shape == x.shape
    assert_close("residual", hr, h, rel=1e-7)
    assert_close("y", yr, y, rel=2e-6)


@pytest.mark.triton
def test_triton_bf16_rounds_like_unfused_block():
    """bf16 branch output + float32 residual stream + bf16 weight (a bf16 Mamba block): the new
    residual is float32, the norm sees it rounded to bf16, y is bf16."""
    dev = triton_device()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 96, generator=g).to(dev, torch.bfloat16)
    r = torch.randn(4, 96, generator=g).to(dev)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dev, torch.bfloat16)
    y, h = add_rms_norm(x, r, w, eps=1e-5, residual_dtype=torch.float32, backend="triton")
    yr, hr = add_rms_norm_reference(x, r, w, 1e-5, torch.float32)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, hr)
    # within a few bf16 ulps per element (the CPU interpreter truncates to bf16 twice; GPUs round)
    assert ((y.float() - yr.float()).abs() <= 2 ** -6 * yr.float().abs() + 1e-6).all()
    # the first block: no residual yet, the embedding (bf16) becomes the float32 stream
    y0, h0 = add_rms_norm(x, None, w, eps=1e-5, residual_dtype=torch.float32, backend="triton")
    assert h0.dtype == torch.float32 and torch.equal(h0, x.float())


@pytest.mark.triton
def test_triton_reads_strided_rows():
    dev = triton_device()
    big = torch.randn(3, 7, 64).to(dev)
    x = big[:, -1]  # (3, 64) rows 7*64 apart: read in place
    r = torch.randn(3, 64).to(dev)
    w = torch.randn(64).to(dev)
    y, h = add_rms_norm(x, r, w, backend="triton")
    yr, hr = _ref64(x, r, w, 1e-5)
    assert_close("y", yr, y, rel=2e-6)


def test_reference_matches_float64_and_autograd_uses_it():
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    y, h = add_rms_norm(x, r, w)  # requires grad: the reference form, differentiable
    yr, hr = _ref64(x, r, w, 1e-5)
    assert_close("y", yr, y, rel=1e-12)
    y.sum().backward()
    assert x.grad is not None


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(2, 9), torch.ones(8))
