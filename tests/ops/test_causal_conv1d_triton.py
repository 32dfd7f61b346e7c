"""The Triton causal conv1d (``backend="triton"``) against the reference form, under the Triton
CPU interpreter without a GPU: outputs, final states and gradients of every input."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

ct = pytest.importorskip("ssmkit.ops.conv.causal_conv1d_triton")
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_reference  # noqa: E402


def _check(bsz, L, dim, W, act, with_init, with_bias, cu=None, dtype=torch.float32, rel=1e-5):
    dev = triton_device()
    g = torch.Generator().manual_seed(L * 7 + dim + W)
    nseq = bsz if cu is None else len(cu) - 1
    x = torch.randn(bsz, L, dim, generator=g, dtype=dtype).to(dev).requires_grad_()
    w = torch.randn(dim, W, generator=g, dtype=dtype).to(dev).requires_grad_()
    b = torch.randn(dim, generator=g, dtype=dtype).to(dev).requires_grad_() if with_bias else None
    h0 = (torch.randn(nseq, dim, W - 1, generator=g, dtype=dtype).to(dev).requires_grad_()
          if with_init else None)
    cu_t = torch.tensor(cu, device=dev) if cu is not None else None
    y, f = ct.causal_conv1d_triton(x, w, b, act, h0, True, cu_t)
    yr, fr = causal_conv1d_reference(x, w, b, act, h0, True, cu_t)
    assert_close("y", yr, y, rel=rel)
    assert_close("final_state", fr, f, rel=rel)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    leaves = [t for t in (x, w, b, h0) if t is not None]
    g1 = torch.autograd.grad((y * gy).sum() + (f * gf).sum(), leaves)
    g2 = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), leaves)
    for n, a, c in zip(("x", "weight", "bias", "initial_state"), g2, g1):
        assert_close(f"grad {n}", a, c, rel=rel)


@pytest.mark.parametrize(
    "bsz,L,dim,W,act,init,bias",
    [(2, 70, 20, 4, "silu", False, True), (1, 5, 8, 4, None, True, False),
     (2, 2, 8, 4, "silu", True, True), (1, 9, 70, 3, "silu", False, False)],
)
def test_matches_reference(bsz, L, dim, W, act, init, bias):
    _check(bsz, L, dim, W, act, init, bias)


@pytest.mark.parametrize("init", [False, True])
def test_cu_seqlens(init):
    _check(1, 12, 8, 4, "silu", init, True, cu=[0, 2, 2, 9, 12])


def test_float64():
    _check(2, 10, 8, 4, "silu", True, True, dtype=torch.float64, rel=1e-6)


# ----------------------------------------------------------------- no-grad forward without copies

_COPY_OPS = ("aten.cat", "aten.clone", "aten.copy_", "aten._to_copy", "aten.constant_pad_nd")


class _FullCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records copy-like aten ops that produce or fill at least ``numel`` elements of ``dtype``.
    The Triton interpreter's own argument transfers copy 1-D uint8 storages, so they never match."""

    def __init__(self, numel, dtype):
        super().__init__()
        self.numel, self.dtype, self.hits = numel, dtype, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(_COPY_OPS):
            res = out[0] if isinstance(out, (tuple, list)) else out
            if (isinstance(res, torch.Tensor) and res.dtype == self.dtype
                    and res.numel() >= self.numel):
                self.hits.append(str(func))
        return out


def _nocopy_inputs(bsz, L, dim, W, with_init, with_bias, dtype, h0_dtype=None, seed=0):
    dev = triton_device()
    g = torch.Generator().manual_seed(seed + L * 7 + dim + W)
    # x: the first half of an in_proj-like output (row stride 2*dim), as in the Mamba layer
    x = torch.randn(bsz, L, 2 * dim, generator=g, dtype=dtype).to(dev)[..., :dim]
    w = torch.randn(dim, W, generator=g, dtype=dtype).to(dev)
    b = torch.randn(dim, generator=g, dtype=dtype).to(dev) if with_bias else None
    h0 = None
    if with_init:  # a strided (non-contiguous) state: a transposed (batch, W-1, dim) buffer
        h0 = torch.randn(bsz, W - 1, dim, generator=g, dtype=h0_dtype or dtype).to(dev)
        h0 = h0.transpose(1, 2)
    return x, w, b, h0


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-6), (torch.float32, 1e-5),
                                       (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("L", [2, 70])
@pytest.mark.parametrize("init,bias,act", [(False, True, "silu"), (True, False, None),
                                           (True, True, "silu")])
def test_nograd_strided_no_copies(dtype, rel, L, init, bias, act):
    """No-grad, non-varlen: x a strided view, seqlen below and above W-1; matches the reference
    (float64 on the same inputs), the final state is exact, and no full-size copy is made."""
    W, dim = 4, 20
    x, w, b, h0 = _nocopy_inputs(2, L, dim, W, init, bias, dtype)
    assert not x.is_contiguous()
    # only the final state itself may be built by a copy (a cat of W-1 rows when L < W-1)
    limit = max(x.numel(), 2 * dim * (W - 1) + 1)
    with torch.inference_mode(), _FullCopies(limit, x.dtype) as rec:
        y, f = ct.causal_conv1d_triton(x, w, b, act, h0, True)
    assert rec.hits == []
    assert y.dtype == dtype and y.is_contiguous() and y.shape == x.shape
    assert f.dtype == dtype and f.shape == (2, dim, W - 1)
    d64 = [t.double() if t is not None else None for t in (x, w, b, h0)]
    yr, fr = causal_conv1d_reference(d64[0], d64[1], d64[2], act, d64[3], True)
    assert_close("y", yr, y, rel=rel)
    assert torch.equal(f.double(), fr)  # the last W-1 inputs, copied exactly


@pytest.mark.parametrize("L", [1, 3, 70])
@pytest.mark.parametrize("init", [False, True])
def test_nograd_matches_autograd_path(L, init):
    """The no-copy forward gives bitwise the autograd (padded, contiguous) path's y and final
    state, and the same dtype and layout of the final state."""
    W, dim = 4, 70
    x, w, b, h0 = _nocopy_inputs(2, L, dim, W, init, True, torch.float32)
    with torch.no_grad():
        y, f = ct.causal_conv1d_triton(x, w, b, "silu", h0, True)
        y_only = ct.causal_conv1d_triton(x, w, b, "silu", h0, False)
    xg = x.clone().requires_grad_()
    y2, f2 = ct.causal_conv1d_triton(xg, w, b, "silu", h0, True)
    assert torch.equal(y, y2.detach()) and torch.equal(y_only, y)
    assert torch.equal(f, f2.detach())
    assert f.dtype == f2.dtype and f.is_contiguous() == f2.is_contiguous()


def test_nograd_state_dtype_and_channel_stride():
    """A float32 initial state with bf16 x is rounded to bf16 as on the padded path; x with a
    channel stride other than 1 (falls back to one copy) still matches."""
    W, dim = 4, 8
    x, w, b, h0 = _nocopy_inputs(2, 5, dim, W, True, True, torch.bfloat16, h0_dtype=torch.float32)
    with torch.no_grad():
        y, f = ct.causal_conv1d_triton(x, w, b, "silu", h0, True)
        y1, f1 = ct.causal_conv1d_triton(x, w, b, "silu", h0, True)
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel stride L
        assert xt.stride(-1) != 1
        y2, f2 = ct.causal_conv1d_triton(xt, w, b, "silu", h0, True)
        y3, f3 = ct.causal_conv1d_triton(x, w, b, "silu", h0.to(x.dtype), True)
    assert torch.equal(y, y1) and torch.equal(y, y2) and torch.equal(y, y3)
    assert torch.equal(f, f2) and torch.equal(f, f3) and f.dtype == torch.bfloat16
    # short sequence: the final state's head comes from the (rounded) initial state
    with torch.no_grad():
        _, fs = ct.causal_conv1d_triton(x[:, :1], w, b, "silu", h0, True)
    assert fs.dtype == torch.bfloat16
    assert torch.equal(fs[:, :, :2], h0[:, :, 1:].to(torch.bfloat16))
    assert torch.equal(fs[:, :, 2], x[:, 0])


def test_copy_detector_sees_padded_path():
    """The detector above does see the padded path's copies (grad enabled: x.contiguous() and
    the prepended state)."""
    x, w, b, h0 = _nocopy_inputs(2, 9, 8, 4, True, True, torch.float32)
    xg = x.detach().requires_grad_()
    with _FullCopies(x.numel(), x.dtype) as rec:
        ct.causal_conv1d_triton(xg, w, b, "silu", h0, True)
    assert rec.hits


@pytest.mark.parametrize("strided", [False, True])
def test_nograd_final_state_not_an_alias_through_custom_op(strided):
    """Batch 1, W = 2: the final state view of x is contiguous; the no-copy path copies it, so the
    custom op (whose forward runs this path under no_grad) returns no alias of its input."""
    from ssmkit.ops import custom_ops

    dev = triton_device()
    x = torch.randn(1, 5, 16 if strided else 8, device=dev)[..., :8]
    w = torch.randn(8, 2, device=dev)
    with torch.no_grad():
        y, f = custom_ops.causal_conv1d(x, w, None, "silu", None, True, backend="triton")
    yr, fr = causal_conv1d_reference(x, w, None, "silu", None, True)
    assert_close("y", yr, y)
    assert torch.equal(f, fr)
