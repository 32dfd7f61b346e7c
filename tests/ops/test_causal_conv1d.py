"""causal_conv1d: chunked == reference (outputs, final states, gradients), state carry, packing,
decode update == forward, and clear errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.compat import causal_conv1d_update as compat_update
from ssmkit.ops import causal_conv1d, causal_conv1d_step, causal_conv1d_update, cpu_compile
from ssmkit.ops.conv import compiled as conv_compiled
from ssmkit.ops.cpu_compile import compiler_available, set_cpu_compile
from ssmkit.testing import assert_close


def _inputs(bsz, L, D, W, dtype=torch.float64, init=True, grad=False):
    x = torch.randn(bsz, L, D, dtype=dtype)
    w = torch.randn(D, W, dtype=dtype)
    b = torch.randn(D, dtype=dtype)
    s = torch.randn(bsz, D, W - 1, dtype=dtype) if init else None
    ts = [x, w, b] + ([s] if init else [])
    for t in ts:
        t.requires_grad_(grad)
    return x, w, b, s


@given(
    bsz=st.integers(1, 3), L=st.integers(1, 17), D=st.integers(1, 6), W=st.integers(1, 5),
    act=st.sampled_from([None, "silu"]), init=st.booleans(), bias=st.booleans(),
)
def test_chunked_matches_reference(bsz, L, D, W, act, init, bias):
    torch.manual_seed(L * 100 + D * 10 + W)
    x, w, b, s = _inputs(bsz, L, D, W, init=init, grad=True)
    b = b if bias else None
    outs = {}
    g = torch.randn(bsz, L, D, dtype=torch.float64)
    for be in ("reference", "chunked"):
        y, f = causal_conv1d(x, w, b, activation=act, initial_state=s, return_final_state=True, backend=be)
        loss = (y * g).sum() + (f * torch.ones_like(f)).sum()
        params = [t for t in (x, w, b, s) if t is not None]
        grads = torch.autograd.grad(loss, params)
        outs[be] = (y, f, grads)
    ry, rf, rg = outs["reference"]
    cy, cf, cg = outs["chunked"]
    assert_close("y", ry, cy, 1e-12)
    assert_close("final", rf, cf, 1e-12)
    for i, (a, c) in enumerate(zip(rg, cg)):
        assert_close(f"grad{i}", a, c, 1e-12)


def test_matches_nn_conv1d():
    D, W, L = 5, 4, 11
    conv = torch.nn.Conv1d(D, D, W, groups=D, padding=W - 1).double()
    x = torch.randn(2, L, D, dtype=torch.float64)
    want = conv(x.transpose(1, 2))[..., :L].transpose(1, 2)
    for be in ("reference", "chunked"):
        got = causal_conv1d(x, conv.weight[:, 0], conv.bias, backend=be)
        assert_close(be, want, got, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_split_and_carry(backend):
    x, w, b, _ = _inputs(2, 20, 3, 4, init=False)
    y, f = causal_conv1d(x, w, b, activation="silu", return_final_state=True, backend=backend)
    for cut in (0, 1, 2, 7, 19, 20):
        y1, f1 = causal_conv1d(x[:, :cut], w, b, activation="silu", return_final_state=True, backend=backend)
        y2, f2 = causal_conv1d(x[:, cut:], w, b, activation="silu", initial_state=f1, return_final_state=True,
                               backend=backend)
        assert_close("y", y, torch.cat([y1, y2], 1), 1e-12)
        assert_close("final", f, f2, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_packed_equals_separate(backend):
    lens = [3, 1, 6, 2]
    D, W = 4, 4
    w, b = torch.randn(D, W, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    inits = torch.randn(len(lens), D, W - 1, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 10, 12], dtype=torch.int32)
    y, f = causal_conv1d(torch.cat(xs, 1), w, b, activation="silu", initial_state=inits, return_final_state=True,
                         cu_seqlens=cu, backend=backend)
    for i, xi in enumerate(xs):
        yi, fi = causal_conv1d(xi, w, b, activation="silu", initial_state=inits[i : i + 1], return_final_state=True,
                               backend=backend)
        assert_close(f"y{i}", yi, y[:, cu[i] : cu[i + 1]], 1e-12)
        assert_close(f"f{i}", fi, f[i : i + 1], 1e-12)


def test_update_matches_forward():
    x, w, b, s = _inputs(2, 9, 3, 4)
    y, f = causal_conv1d(x, w, b, activation="silu", initial_state=s, return_final_state=True)
    state = s.clone()
    ys = [causal_conv1d_step(state, x[:, 0], w, b, activation="silu")]
    ys.append(causal_conv1d_step(state, x[:, 1:5], w, b, activation="silu"))
    ys += [causal_conv1d_step(state, x[:, t], w, b, activation="silu") for t in range(5, 7)]
    with pytest.warns(DeprecationWarning, match="causal_conv1d_step"):  # the old name: x first
        ys.append(causal_conv1d_update(x[:, 7], state, w, b, "silu"))
    ys.append(compat_update(x[:, 8], state, w, b, "silu"))  # the causal_conv1d package's order, no warning
    got = torch.cat([ys[0][:, None], ys[1]] + [t[:, None] for t in ys[2:]], 1)
    assert_close("y", y, got, 1e-12)
    assert_close("state", f, state, 1e-12)
    # compat with several tokens: channels before time, as in the causal_conv1d package
    state = s.clone()
    yc = compat_update(x.transpose(1, 2), state, w, b, True)
    assert_close("compat y", y, yc.transpose(1, 2), 1e-12)
    assert_close("compat state", f, state, 1e-12)


def test_width_one():
    x, w, b, _ = _inputs(1, 5, 2, 1, init=False)
    y, f = causal_conv1d(x, w, b, return_final_state=True)
    assert f.shape == (1, 2, 0)
    assert_close("y", x * w[:, 0] + b, y, 1e-12)
    st0 = torch.zeros(1, 2, 0, dtype=torch.float64)
    assert_close("upd", y[:, 0], causal_conv1d_step(st0, x[:, 0], w, b), 1e-12)


def test_bad_input():
    x = torch.randn(2, 5, 3)
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="x"):
        causal_conv1d(torch.randn(5, 3), w)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w, initial_state=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="batch"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="sorted"):
        causal_conv1d(x[:1], w, cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(TypeError, match="x"):
        causal_conv1d(x.long(), w)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_step(torch.zeros(2, 3, 2), x[:, 0], w)



@given(
    bsz=st.integers(1, 2), L=st.integers(0, 12), D=st.integers(1, 5), W=st.integers(1, 5),
    act=st.sampled_from([None, "silu"]), init=st.booleans(), bias=st.booleans(),
)
def test_chunked_no_grad_path_matches_reference(bsz, L, D, W, act, init, bias):
    """Without autograd the fast form adds the taps in place (no padded copy)."""
    x, w, b, s = _inputs(bsz, L, D, W, init=init)
    b = b if bias else None
    with torch.no_grad():
        ry, rf = causal_conv1d(x, w, b, activation=act, initial_state=s, return_final_state=True, backend="reference")
        cy, cf = causal_conv1d(x, w, b, activation=act, initial_state=s, return_final_state=True, backend="chunked")
    assert_close("y", ry, cy, 1e-12)
    assert_close("final", rf, cf, 1e-12)


@pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler for torch.compile")
def test_compiled_rows_match_reference(monkeypatch):
    """Inference in float32 through the compiled row blocks (ssmkit.ops.cpu_compile), blocks of 4
    rows. 14 rows: the first 3 from the initial state, blocks at rows 3 and 7, and a last block at
    10 overlapping the one before. Batch 2, x a column slice of a wider projection (read in place),
    with and without bias and initial state."""
    monkeypatch.setattr(conv_compiled, "ROWS", 4)
    monkeypatch.setattr(cpu_compile, "_graphs", {})
    set_cpu_compile(True)
    try:
        torch.manual_seed(0)
        for bias, init in ((True, True), (False, False)):
            x, w, b, s = _inputs(2, 14, 5, 4, init=init)
            b = b if bias else None
            ref, fref = causal_conv1d(x, w, b, activation="silu", initial_state=s, return_final_state=True,
                                      backend="reference")
            xz = torch.cat([x, x], -1).float()
            with torch.inference_mode():
                y, f = causal_conv1d(xz[..., :5], w.float(), None if b is None else b.float(), activation="silu",
                                     initial_state=None if s is None else s.float(), return_final_state=True,
                                     backend="chunked")
            assert_close("y", ref, y, 1e-5)
            assert_close("final_state", fref, f, 1e-6)
        assert any(k[0] == "causal_conv1d" for k in cpu_compile._graphs)  # the compiled blocks ran
    finally:
        set_cpu_compile(None)
