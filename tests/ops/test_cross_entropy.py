"""linear_cross_entropy: the chunked form against the reference in float64 (loss and both
gradients), ignored rows, chunks that do not divide the rows, autocast, errors."""

import pytest
import torch

from ssmkit.ops.cross_entropy import linear_cross_entropy
from ssmkit.testing import assert_close


def _inputs(rows=23, d=8, V=37, dtype=torch.float64, ignore=(0, 5, 22)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[list(ignore)] = -100
    return x, w, labels


@pytest.mark.parametrize("chunk_rows", [1, 4, 23, 100, None])
def test_chunked_matches_reference_float64(chunk_rows):
    x, w, labels = _inputs()
    ref = linear_cross_entropy(x, w, labels, backend="reference")
    out = linear_cross_entropy(x, w, labels, chunk_rows=chunk_rows, backend="chunked")
    assert_close("loss", ref, out, rel=1e-12)
    for name, a, b in zip(("dx", "dw"), torch.autograd.grad(3 * ref, (x, w)),
                          torch.autograd.grad(3 * out, (x, w))):
        assert_close(name, a, b, rel=1e-12)


def test_no_scored_row_is_nan_like_cross_entropy():
    x, w, labels = _inputs(rows=3, ignore=(0, 1, 2))
    assert linear_cross_entropy(x, w, labels).isnan() and linear_cross_entropy(x, w, labels, backend="reference").isnan()


def test_autocast_bfloat16_products():
    """Under CPU autocast the products run in bfloat16 (as F.linear would): the loss and the
    gradients agree with the reference under the same autocast to bfloat16 accuracy."""
    x, w, labels = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy(x, w, labels, backend="reference")
        out = linear_cross_entropy(x, w, labels, chunk_rows=5)
    assert out.dtype == torch.float32
    assert_close("loss", ref, out, rel=1e-2)
    gr = torch.autograd.grad(ref, (x, w))
    go = torch.autograd.grad(out, (x, w))
    for name, a, b in zip(("dx", "dw"), gr, go):
        assert b.dtype == torch.float32
        assert_close(name, a, b, rel=2e-2)


def test_bad_inputs():
    x, w, labels = _inputs()
    with pytest.raises(ValueError, match="x must be"):
        linear_cross_entropy(x[0], w, labels)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(x, w[:, :3], labels)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(x, w, labels.float())
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(x, w, labels, chunk_rows=0)
