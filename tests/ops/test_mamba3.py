"""Mamba-3 (SISO and MIMO): chunked == reference == step, gradients, state contract, packing, errors."""

import math

import pytest
import torch

from ssmkit.ops.mamba3 import Mamba3Carry, mamba3, mamba3_step
from ssmkit.testing import assert_close

# (R, rotary_pairs, G): SISO with and without grouped B/C, MIMO in both rotary layouts
CASES = [(None, "interleaved", 1), (None, "halves", 2), (2, "interleaved", 1), (3, "halves", 2)]


def make_inputs(b, l, h=4, p=3, g=1, n=8, s=2, r=None, *, dtype=torch.float64, init=True, z=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rn(*sh):
        return torch.randn(*sh, generator=gen, dtype=dtype)

    dt = torch.nn.functional.softplus(rn(b, l, h) - 1)
    rank = () if r is None else (r,)
    inp = dict(x=rn(b, l, h, p), dt=dt, dA=-torch.rand(b, l, h, generator=gen, dtype=dtype) * 2 * dt,
               B=rn(b, l, *rank, g, n), C=rn(b, l, *rank, g, n), trap=rn(b, l, h), angles=rn(b, l, h, s) * 2)
    kw = dict(D=rn(h), z=rn(b, l, h, p) if z else None, B_bias=rn(h, *rank, n), C_bias=rn(h, *rank, n))
    if r is not None:
        kw.update(mimo_x=rn(h, r, p), mimo_z=rn(h, r, p) if z else None, mimo_o=rn(h, r, p))
    state = None
    if init:
        state = Mamba3Carry(torch.rand(b, h, s, generator=gen, dtype=dtype) * 6, rn(b, h, p, n),
                            rn(b, r or 1, h, n), rn(b, h, p))
    return inp, kw, state


def circular(a, b):
    """Angles compared on the circle (the forms may wrap at 2π on either side)."""
    d = torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi
    return d


def check_states(name, ref, got, rel):
    assert_close(f"{name} angle", torch.zeros_like(ref.angle), circular(got.angle, ref.angle), atol=rel * 10)
    for f in ("ssm", "k", "v"):
        assert_close(f"{name} {f}", getattr(ref, f), getattr(got, f), rel)


@pytest.mark.parametrize("r,pairs,g", CASES)
@pytest.mark.parametrize("l,chunk", [(1, 64), (13, 4), (24, 8)])
def test_chunked_and_step_match_reference_float64(r, pairs, g, l, chunk):
    inp, kw, st = make_inputs(2, l, g=g, r=r)
    ref, ref_st = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, return_final_state=True,
                         backend="reference")
    y, fin = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, chunk_size=chunk, return_final_state=True,
                    backend="chunked")
    assert_close("chunked y", ref, y, 1e-10)
    check_states("chunked", ref_st, fin, 1e-10)
    state = Mamba3Carry(*(t.clone() for t in st))
    ys = mamba3_step(state, **inp, **kw, rotary_pairs=pairs)
    assert_close("step y", ref, ys, 1e-10)
    check_states("step", ref_st, state, 1e-10)


@pytest.mark.parametrize("r,pairs,g", CASES[::2] + CASES[3:])
def test_float32_matches_float64_reference(r, pairs, g):
    inp, kw, st = make_inputs(2, 40, g=g, r=r)
    ref, ref_st = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, return_final_state=True,
                         backend="reference")
    f32 = {k: v.float() for k, v in inp.items()}
    kw32 = {k: None if v is None else v.float() for k, v in kw.items()}
    st32 = Mamba3Carry(*(t.float() for t in st))
    y, fin = mamba3(**f32, **kw32, rotary_pairs=pairs, initial_state=st32, chunk_size=16, return_final_state=True)
    assert_close("chunked y", ref, y, 1e-5)
    check_states("chunked", ref_st, fin, 1e-5)
    ys = mamba3_step(st32, **f32, **kw32, rotary_pairs=pairs)
    assert_close("step y", ref, ys, 1e-5)


def _grads(form, inp, kw, st, pairs, wy, wst):
    leaves = {k: v.clone().requires_grad_(True) for k, v in {**inp, **kw}.items() if v is not None}
    st = Mamba3Carry(*(t.clone().requires_grad_(True) for t in st))
    x = {k: leaves.get(k) for k in (*inp, *kw)}
    y, fin = mamba3(**x, rotary_pairs=pairs, initial_state=st, chunk_size=4, return_final_state=True, backend=form)
    loss = (y * wy).sum() + sum((torch.sin(a) if i == 0 else a) .mul(w).sum()
                                for i, (a, w) in enumerate(zip(fin, wst)))
    loss.backward()
    return {**{k: v.grad for k, v in leaves.items()}, **{f"state.{f}": getattr(st, f).grad for f in st._fields}}


@pytest.mark.parametrize("r,pairs,g", [CASES[1], CASES[3]])
def test_gradients_match_reference(r, pairs, g):
    inp, kw, st = make_inputs(2, 11, g=g, r=r)
    gen = torch.Generator().manual_seed(5)
    y0, f0 = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, return_final_state=True)
    wy = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    wst = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in f0]
    ref = _grads("reference", inp, kw, st, pairs, wy, wst)
    got = _grads("chunked", inp, kw, st, pairs, wy, wst)
    assert set(ref) == set(got)
    for k in ref:
        assert ref[k] is not None, k
        assert_close(f"d{k}", ref[k], got[k], 1e-10)


@pytest.mark.parametrize("r", [None, 2])
def test_split_and_carry_equals_one_pass(r):
    inp, kw, st = make_inputs(2, 21, r=r)
    y, fin = mamba3(**inp, **kw, initial_state=st, chunk_size=4, return_final_state=True)
    cut = 9

    def part(sl):
        return ({k: v[:, sl] for k, v in inp.items()},
                {k: v[:, sl] if k == "z" and v is not None else v for k, v in kw.items()})

    i1, k1 = part(slice(0, cut))
    y1, s1 = mamba3(**i1, **k1, initial_state=st, chunk_size=4, return_final_state=True)
    i2, k2 = part(slice(cut, None))
    y2, s2 = mamba3(**i2, **k2, initial_state=s1, chunk_size=4, return_final_state=True)
    assert_close("y", y, torch.cat([y1, y2], 1), 1e-10)
    check_states("carried", fin, s2, 1e-10)


@pytest.mark.parametrize("form", ["reference", "chunked"])
@pytest.mark.parametrize("r", [None, 2])
def test_packed_equals_separate(form, r):
    lens = [5, 0, 11, 1]
    seqs = [make_inputs(1, max(n, 1), r=r, seed=i) for i, n in enumerate(lens)]
    packed = {k: torch.cat([s[0][k][:, :n] for s, n in zip(seqs, lens)], 1) for k in seqs[0][0]}
    shared = {k: v for k, v in seqs[0][1].items() if k != "z"}
    zs = torch.cat([s[1]["z"][:, :n] for s, n in zip(seqs, lens)], 1)
    init = Mamba3Carry(*(torch.cat([getattr(s[2], f) for s in seqs]) for f in Mamba3Carry._fields))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    y, fin = mamba3(**packed, **shared, z=zs, initial_state=init, chunk_size=4, return_final_state=True,
                    cu_seqlens=cu, backend=form)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        if n == 0:
            for f in Mamba3Carry._fields:
                assert_close(f"empty {f}", getattr(s[2], f) if f != "angle" else s[2].angle,
                             getattr(fin, f)[i:i + 1], 1e-12)
            continue
        inp = {k: v[:, :n] for k, v in s[0].items()}
        yi, si = mamba3(**inp, **shared, z=s[1]["z"][:, :n], initial_state=s[2], return_final_state=True,
                        backend=form)
        a = cu[i].item()
        assert_close(f"y[{i}]", yi, y[:, a:a + n], 1e-10)
        check_states(f"seq {i}", si, Mamba3Carry(*(t[i:i + 1] for t in fin)), 1e-10)


def test_strong_decay_long_sequence_float32_finite():
    inp, kw, _ = make_inputs(1, 2048, h=2, p=4, n=8, dtype=torch.float32, init=False)
    inp["dA"] = -30.0 * inp["dt"]
    leaves = [inp[k].requires_grad_(True) for k in ("x", "B", "C", "dA")]
    y = mamba3(**inp, **kw)
    y.sum().backward()
    assert torch.isfinite(y).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()


def test_mimo_without_mimo_o_keeps_rank_axis():
    inp, kw, _ = make_inputs(1, 6, r=2, init=False)
    kw["mimo_o"] = None
    y = mamba3(**inp, **kw)
    assert y.shape == (1, 6, 2, 4, 3)


def test_errors_name_the_argument():
    inp, kw, st = make_inputs(1, 6)
    with pytest.raises(ValueError, match="dA must have shape"):
        mamba3(**{**inp, "dA": inp["dA"][..., :2]})
    with pytest.raises(ValueError, match="angles must have shape"):
        mamba3(**{**inp, "angles": torch.zeros(1, 6, 4, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="rotary_pairs"):
        mamba3(**inp, rotary_pairs="pairs")
    with pytest.raises(ValueError, match="mimo_x given"):
        mamba3(**inp, mimo_x=torch.ones(4, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="initial_state.ssm must have shape"):
        mamba3(**inp, initial_state=st._replace(ssm=st.ssm[..., :3]))
    with pytest.raises(TypeError, match="Mamba3Carry"):
        mamba3(**inp, initial_state=tuple(st))
    minp, mkw, _ = make_inputs(1, 6, r=2, init=False)
    with pytest.raises(TypeError, match="mimo_x must be a tensor"):
        mamba3(**minp)
    with pytest.raises(ValueError, match="mimo_z is None"):
        mamba3(**minp, z=mkw["z"], mimo_x=mkw["mimo_x"])


def test_returned_state_owns_its_memory():
    """The step updates the state in place: it must not write into the inputs it came from."""
    inp, kw, _ = make_inputs(1, 5, init=False)
    x0 = inp["x"].clone()
    _, st = mamba3(**inp, **kw, return_final_state=True)
    one = {k: v[:, 0] for k, v in inp.items()}
    mamba3_step(st, **one, **{**kw, "z": kw["z"][:, 0]})
    assert torch.equal(inp["x"], x0)


def test_long_sequence_angles_keep_float32_accuracy():
    """Angles accumulated over 20k tokens reach ~10^4 rad: the chunked form must still agree with
    token-by-token decoding (which wraps every step) to float32 accuracy."""
    inp, kw, _ = make_inputs(1, 20000, h=1, p=2, n=4, s=2, dtype=torch.float32, init=False, z=False)
    inp["dt"] = torch.full_like(inp["dt"], 0.5)
    inp["angles"] = torch.full_like(inp["angles"], 3.0)  # tanh(3)·π·0.5 ≈ 1.56 rad a token
    tail = {k: v[:, -8:] for k, v in inp.items()}
    head = {k: v[:, :-8] for k, v in inp.items()}
    _, st = mamba3(**head, **kw, return_final_state=True)
    ref = mamba3(**inp, **kw)[:, -8:]
    got = mamba3_step(st, **tail, **kw)
    assert_close("last tokens", ref, got, 1e-5)
    assert st.angle.min() >= 0 and st.angle.max() < 2 * math.pi
