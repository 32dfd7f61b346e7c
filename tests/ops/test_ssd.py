"""SSD (Mamba-2): chunked == quadratic == reference, gradients, stability, state contract, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import dispatch
from ssmkit.ops.ssd import ssd, ssd_state_update, ssd_step
from ssmkit.testing import assert_close

FORMS = ("quadratic", "chunked")


def make_inputs(b, l, h, p, g, n, *, dtype=torch.float64, d_kind="head", init=True, z=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    inp = dict(
        x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.1,
        B=r(b, l, g, n), C=r(b, l, g, n),
    )
    kw = dict(
        D={"head": r(h), "channel": r(h, p), None: None}[d_kind],
        z=r(b, l, h, p) if z else None,
        dt_bias=r(h), dt_softplus=True,
        initial_state=r(b, h, p, n) if init else None,
    )
    return inp, kw


@st.composite
def shapes(draw):
    h_per_g = draw(st.integers(1, 3))
    g_choice = draw(st.sampled_from(["one", "two", "all"]))
    if g_choice == "one":
        g, h = 1, h_per_g
    elif g_choice == "two":
        g, h = 2, 2 * h_per_g
    else:
        h = draw(st.integers(1, 3))
        g = h
    return dict(
        b=draw(st.integers(1, 2)), l=draw(st.sampled_from([1, 2, 7, 16, 23])), h=h, g=g,
        p=draw(st.integers(1, 4)), n=draw(st.integers(1, 5)), chunk=draw(st.sampled_from([1, 4, 5, 8, 64])),
        d_kind=draw(st.sampled_from([None, "head", "channel"])), init=draw(st.booleans()), z=draw(st.booleans()),
        limit=draw(st.sampled_from([(0.0, math.inf), (0.01, 2.0)])),
    )


@settings(max_examples=25)
@given(s=shapes())
def test_forms_match_reference_float64(s):
    inp, kw = make_inputs(s["b"], s["l"], s["h"], s["p"], s["g"], s["n"], d_kind=s["d_kind"], init=s["init"],
                          z=s["z"])
    kw.update(chunk_size=s["chunk"], dt_limit=s["limit"], return_final_state=True)
    y_ref, h_ref = ssd(**inp, **kw, backend="reference")
    for form in FORMS:
        y, hT = ssd(**inp, **kw, backend=form)
        assert hT.is_contiguous(), "the final state must be contiguous (decoding updates it in place)"
        assert_close(f"{form} y", y_ref, y, rel=1e-10)
        assert_close(f"{form} final state", h_ref, hT, rel=1e-10)


@settings(max_examples=10)
@given(s=shapes())
def test_chunked_float32_matches_float64_reference(s):
    inp, kw = make_inputs(s["b"], s["l"], s["h"], s["p"], s["g"], s["n"], d_kind=s["d_kind"], init=s["init"],
                          z=s["z"])
    kw.update(chunk_size=s["chunk"], return_final_state=True)
    y_ref, h_ref = ssd(**inp, **kw, backend="reference")
    f32 = {k: v.float() for k, v in inp.items()}
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y, hT = ssd(**f32, **kw32, backend="chunked")
    assert y.dtype == torch.float32 and hT.dtype == torch.float32
    assert_close("y float32", y_ref, y, rel=1e-5)
    assert_close("state float32", h_ref, hT, rel=1e-5)


def _grads(form, inp, kw, wy, wh):
    leaves = {k: v.clone().requires_grad_(True) for k, v in {**inp, **kw}.items() if isinstance(v, torch.Tensor)}
    args = {k: leaves.get(k, v) for k, v in {**inp, **kw}.items()}
    y, hT = ssd(**args, return_final_state=True, backend=form)
    ((y * wy).sum() + (hT * wh).sum()).backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("g,h,d_kind", [(1, 2, "head"), (2, 4, "channel"), (3, 3, None)])
def test_gradients_match_reference(g, h, d_kind):
    b, l, p, n = 2, 19, 3, 4
    inp, kw = make_inputs(b, l, h, p, g, n, d_kind=d_kind)
    kw["chunk_size"] = 6
    wy, wh = torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, h, p, n, dtype=torch.float64)
    ref = _grads("reference", inp, kw, wy, wh)
    for form in FORMS:
        got = _grads(form, inp, kw, wy, wh)
        for k in ref:
            assert_close(f"{form} d{k}", ref[k], got[k], rel=1e-10)


def test_float32_gradients_match_float64_reference():
    b, l, h, p, g, n = 2, 45, 4, 3, 2, 5
    inp, kw = make_inputs(b, l, h, p, g, n, d_kind="channel")
    kw["chunk_size"] = 16
    wy, wh = torch.randn(b, l, h, p, dtype=torch.float64), torch.randn(b, h, p, n, dtype=torch.float64)
    ref = _grads("reference", inp, kw, wy, wh)
    f32 = {k: v.float() for k, v in inp.items()}
    kw32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got = _grads("chunked", f32, kw32, wy.float(), wh.float())
    for k in ref:
        assert_close(f"float32 d{k}", ref[k], got[k], rel=1e-5)


@pytest.mark.parametrize("form", ["reference", "quadratic", "chunked"])
def test_gradcheck_tiny(form):
    inp, kw = make_inputs(1, 5, 2, 2, 1, 2, d_kind="channel")
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
    vals = [{**inp, **kw}[k].clone().requires_grad_(True) for k in names]

    def f(*t):
        a = dict(zip(names, t))
        y, hT = ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=2, D=a["D"], z=a["z"],
                    dt_bias=a["dt_bias"], dt_softplus=True, initial_state=a["initial_state"],
                    return_final_state=True, backend=form)
        return y, hT

    assert torch.autograd.gradcheck(f, vals, fast_mode=True)


def test_stability_strong_decay_and_65536_tokens_float32():
    l, h = 65536, 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, l, h, 1, generator=gen)
    # per-step decay from exp(-30) (Δ = 1, A = -30) down to almost none (Δ = 1e-4)
    dt = torch.where(torch.rand(1, l, h, generator=gen) < 0.5, torch.tensor(1.0), torch.tensor(1e-4))
    A = torch.tensor([-30.0, -0.5])
    B = torch.randn(1, l, 1, 2, generator=gen)
    C = torch.randn(1, l, 1, 2, generator=gen)
    leaves = [t.requires_grad_(True) for t in (x, dt, A, B, C)]
    y, hT = ssd(*leaves, chunk_size=64, return_final_state=True, backend="chunked")
    assert torch.isfinite(y).all() and torch.isfinite(hT).all()
    (y.square().mean() + hT.square().sum()).backward()
    for name, t in zip("x dt A B C".split(), leaves):
        assert torch.isfinite(t.grad).all(), f"d{name} has non-finite values"
    # a float64 slice agrees with the recurrence despite exp(-30) steps
    sl = slice(0, 300)
    args = [t.detach()[:, sl].double() if t.dim() > 1 else t.detach().double() for t in leaves]
    y_ref = ssd(*args, backend="reference")
    for form in FORMS:
        assert_close(f"{form} strong decay", y_ref, ssd(*args, chunk_size=64, backend=form), rel=1e-10)


def test_growing_state_positive_log_decays():
    """A > 0 (a growing state) is unusual but must not give a silently wrong answer."""
    inp, kw = make_inputs(1, 20, 2, 3, 1, 4, d_kind=None, z=False)
    inp["A"] = torch.tensor([0.3, -0.5], dtype=torch.float64)
    kw.update(dt_softplus=True, chunk_size=8, return_final_state=True)
    y_ref, h_ref = ssd(**inp, **kw, backend="reference")
    for form in FORMS:
        y, hT = ssd(**inp, **kw, backend=form)
        assert_close(f"{form} y", y_ref, y, rel=1e-10)
        assert_close(f"{form} state", h_ref, hT, rel=1e-10)


@pytest.mark.parametrize("form", ["reference", "quadratic", "chunked"])
def test_split_and_carry_equals_one_pass(form):
    inp, kw = make_inputs(2, 21, 4, 3, 2, 5, d_kind="channel")
    kw.update(chunk_size=4, return_final_state=True)
    y, hT = ssd(**inp, **kw, backend=form)
    cut = 9
    first = {k: v[:, :cut] if k != "A" else v for k, v in inp.items()}
    second = {k: v[:, cut:] if k != "A" else v for k, v in inp.items()}
    z = kw.pop("z")
    y1, h1 = ssd(**first, **kw, z=z[:, :cut], backend=form)
    y2, h2 = ssd(**second, **{**kw, "initial_state": h1}, z=z[:, cut:], backend=form)
    assert_close("y", y, torch.cat([y1, y2], 1), rel=1e-12)
    assert_close("state", hT, h2, rel=1e-12)


@pytest.mark.parametrize("form", ["reference", "quadratic", "chunked"])
def test_packed_equals_separate(form):
    lens = [5, 1, 11, 0, 7]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lens)
    inp, kw = make_inputs(1, total, 4, 2, 2, 3, d_kind="head", init=False)
    kw.pop("initial_state")
    init = torch.randn(len(lens), 4, 2, 3, dtype=torch.float64)
    y, hT = ssd(**inp, **kw, chunk_size=4, initial_state=init, return_final_state=True, cu_seqlens=cu,
                backend=form)
    for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == e:
            assert_close("empty sequence keeps its state", init[i], hT[i], rel=0)
            continue
        part = {k: v[:, a:e] if k != "A" else v for k, v in inp.items()}
        yi, hi = ssd(**part, **{**kw, "z": kw["z"][:, a:e]}, chunk_size=4, initial_state=init[i : i + 1],
                     return_final_state=True, backend="reference")
        assert_close(f"y of sequence {i}", yi, y[:, a:e], rel=1e-12)
        assert_close(f"state of sequence {i}", hi, hT[i : i + 1], rel=1e-12)


@pytest.mark.parametrize("d_kind", ["head", "channel"])
def test_state_update_repeated_equals_forward(d_kind):
    b, l, h, p, g, n = 2, 9, 4, 3, 2, 5
    inp, kw = make_inputs(b, l, h, p, g, n, d_kind=d_kind)
    kw["dt_limit"] = (0.01, 1.5)
    y, hT = ssd(**inp, **kw, return_final_state=True, backend="chunked")
    state = kw["initial_state"].clone()
    ys = []
    for t in range(l - 4):
        ys.append(ssd_step(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                           D=kw["D"], z=kw["z"][:, t], dt_bias=kw["dt_bias"], dt_softplus=True,
                           dt_limit=(0.01, 1.5)))
    # the last 4 tokens in one call (T >= 1)
    last = slice(l - 4, l)
    y_last = ssd_step(state, inp["x"][:, last], inp["dt"][:, last], inp["A"], inp["B"][:, last], inp["C"][:, last],
                      D=kw["D"], z=kw["z"][:, last], dt_bias=kw["dt_bias"], dt_softplus=True,
                      dt_limit=(0.01, 1.5), backend="reference")
    assert_close("step outputs", y, torch.cat([torch.stack(ys, 1), y_last], 1), rel=1e-12)
    assert_close("step state", hT, state, rel=1e-12)
    # the deprecated name, options positional, still works (one token)
    with pytest.warns(DeprecationWarning, match="ssd_step"):
        ssd_state_update(state.clone(), inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                         kw["D"], kw["z"][:, 0], kw["dt_bias"], True, (0.01, 1.5))


def test_half_inputs_keep_float32_state():
    inp, kw = make_inputs(1, 10, 2, 4, 1, 3, init=False)
    bf = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    y, hT = ssd(**bf, chunk_size=4, return_final_state=True)
    assert y.dtype == torch.bfloat16 and hT.dtype == torch.float32


def test_registered_forms():
    assert {"reference", "quadratic", "chunked"} <= set(dispatch.available("ssd"))


def test_bad_inputs_raise_clear_errors():
    inp, _ = make_inputs(1, 6, 4, 2, 2, 3, init=False, z=False)
    x, dt, A, B, C = inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"]
    with pytest.raises(ValueError, match="groups G=3.*must divide.*H=4"):
        ssd(x, dt, A, torch.randn(1, 6, 3, 3, dtype=x.dtype), torch.randn(1, 6, 3, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd(x, dt[..., :3], A, B, C)
    with pytest.raises(ValueError, match="A must have shape"):
        ssd(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match="C must have shape"):
        ssd(x, dt, A, B, C[..., :2])
    with pytest.raises(ValueError, match=r"D must have shape \(H=4,\) or \(H=4, P=2\)"):
        ssd(x, dt, A, B, C, D=torch.ones(4, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        ssd(x, dt, A, B, C, initial_state=torch.zeros(1, 4, 3, 3, dtype=x.dtype))  # P mismatch
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        ssd(x[0], dt, A, B, C)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ssd(x.long(), dt, A, B, C)
    with pytest.raises(ValueError, match="dt_limit"):
        ssd(x, dt, A, B, C, dt_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match="backend='nope' is not available"):
        ssd(x, dt, A, B, C, backend="nope")
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at seqlen"):
        ssd(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="state must have shape"):
        ssd_step(torch.zeros(1, 4, 2, 2), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
