"""Delta rule (DeltaNet, gated DeltaNet): chunked == reference, gradients, stability, contract, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.ops import dispatch
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step
from ssmkit.testing import assert_close


def make_inputs(b, l, h, dk, dv, *, gated=True, init=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    inp = dict(q=r(b, l, h, dk), k=r(b, l, h, dk), v=r(b, l, h, dv),
               beta=torch.rand(b, l, h, generator=gen, dtype=dtype),
               g=-torch.rand(b, l, h, generator=gen, dtype=dtype) * 2 if gated else None)
    return inp, dict(initial_state=r(b, h, dk, dv) if init else None)


@st.composite
def cases(draw):
    return dict(b=draw(st.integers(1, 2)), l=draw(st.sampled_from([1, 3, 8, 13, 30])), h=draw(st.integers(1, 3)),
                dk=draw(st.integers(1, 5)), dv=draw(st.integers(1, 4)), chunk=draw(st.sampled_from([1, 4, 5, 16, 64])),
                gated=draw(st.booleans()), init=draw(st.booleans()), l2=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.5])))


@settings(max_examples=25)
@given(c=cases())
def test_chunked_matches_reference_float64(c):
    inp, kw = make_inputs(c["b"], c["l"], c["h"], c["dk"], c["dv"], gated=c["gated"], init=c["init"])
    if not c["l2"]:  # keep the unnormalised recurrence contractive: |k|^2 beta < 2
        inp["k"] = inp["k"] / (inp["k"].norm(dim=-1, keepdim=True) + 1e-3)
    kw.update(use_qk_l2norm=c["l2"], scale=c["scale"], chunk_size=c["chunk"], return_final_state=True)
    o_ref, s_ref = delta_rule(**inp, **kw, backend="reference")
    o, s = delta_rule(**inp, **kw, backend="chunked")
    assert_close("o", o_ref, o, rel=1e-10)
    assert_close("final state", s_ref, s, rel=1e-10)


@settings(max_examples=10)
@given(c=cases())
def test_chunked_float32_matches_float64_reference(c):
    inp, kw = make_inputs(c["b"], c["l"], c["h"], c["dk"], c["dv"], gated=c["gated"], init=c["init"])
    kw.update(use_qk_l2norm=True, chunk_size=c["chunk"], return_final_state=True)
    o_ref, s_ref = delta_rule(**inp, **kw, backend="reference")
    f32 = {k: None if v is None else v.float() for k, v in inp.items()}
    kw32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    o, s = delta_rule(**f32, **kw32, backend="chunked")
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close("o float32", o_ref, o, rel=1e-5)
    assert_close("state float32", s_ref, s, rel=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_match_reference(gated):
    b, l, h, dk, dv = 2, 17, 2, 4, 3
    inp, kw = make_inputs(b, l, h, dk, dv, gated=gated)
    wo, ws = torch.randn(b, l, h, dv, dtype=torch.float64), torch.randn(b, h, dk, dv, dtype=torch.float64)

    def grads(form):
        leaves = {k: v.clone().requires_grad_(True) for k, v in {**inp, **kw}.items() if v is not None}
        args = {**inp, **kw, **leaves}
        o, s = delta_rule(**args, use_qk_l2norm=True, scale=0.7, chunk_size=5, return_final_state=True,
                          backend=form)
        ((o * wo).sum() + (s * ws).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    ref, got = grads("reference"), grads("chunked")
    for k in ref:
        assert_close(f"d{k}", ref[k], got[k], rel=1e-10)


@pytest.mark.parametrize("gated", [False, True])
def test_float32_gradients_match_float64_reference(gated):
    b, l, h, dk, dv = 2, 40, 2, 4, 3
    inp, kw = make_inputs(b, l, h, dk, dv, gated=gated)
    wo, ws = torch.randn(b, l, h, dv, dtype=torch.float64), torch.randn(b, h, dk, dv, dtype=torch.float64)

    def grads(form, dtype):
        leaves = {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in {**inp, **kw}.items()
                  if v is not None}
        o, s = delta_rule(**{**inp, **kw, **leaves}, use_qk_l2norm=True, chunk_size=16, return_final_state=True,
                          backend=form)
        ((o * wo.to(dtype)).sum() + (s * ws.to(dtype)).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    ref, got = grads("reference", torch.float64), grads("chunked", torch.float32)
    for k in ref:
        assert_close(f"float32 d{k}", ref[k], got[k], rel=1e-5)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_gradcheck_tiny(form):
    inp, kw = make_inputs(1, 5, 1, 2, 2)
    names = ["q", "k", "v", "beta", "g", "initial_state"]
    vals = [{**inp, **kw}[n].clone().requires_grad_(True) for n in names]

    def f(q, k, v, beta, g, s0):
        return delta_rule(q, k, v, beta=beta, g=g, use_qk_l2norm=True, chunk_size=2, initial_state=s0,
                          return_final_state=True, backend=form)

    assert torch.autograd.gradcheck(f, vals, fast_mode=True)


def test_stability_strong_decay_and_65536_tokens_float32():
    l, h, d = 65536, 1, 2
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, l, h, d, generator=gen) for _ in range(3))
    beta = torch.rand(1, l, h, generator=gen)
    # log decay per step between -30 and 0
    g = torch.where(torch.rand(1, l, h, generator=gen) < 0.5, torch.tensor(-30.0), torch.tensor(-1e-4))
    leaves = [t.requires_grad_(True) for t in (q, k, v, beta, g)]
    o, s = delta_rule(*leaves[:3], beta=leaves[3], g=leaves[4], use_qk_l2norm=True, chunk_size=64,
                      return_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    (o.square().mean() + s.square().sum()).backward()
    for name, t in zip("q k v beta g".split(), leaves):
        assert torch.isfinite(t.grad).all(), f"d{name} has non-finite values"
    sl = slice(0, 200)
    args = [t.detach()[:, sl].double() for t in leaves]
    bg = dict(beta=args[3], g=args[4])
    assert_close("strong decay", delta_rule(*args[:3], **bg, use_qk_l2norm=True, backend="reference"),
                 delta_rule(*args[:3], **bg, use_qk_l2norm=True, chunk_size=64, backend="chunked"), rel=1e-10)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_split_and_carry_equals_one_pass(form):
    inp, kw = make_inputs(2, 19, 2, 3, 4)
    o, s = delta_rule(**inp, **kw, use_qk_l2norm=True, chunk_size=4, return_final_state=True, backend=form)
    a = {k: v[:, :8] for k, v in inp.items()}
    b = {k: v[:, 8:] for k, v in inp.items()}
    o1, s1 = delta_rule(**a, **kw, use_qk_l2norm=True, chunk_size=4, return_final_state=True, backend=form)
    o2, s2 = delta_rule(**b, initial_state=s1, use_qk_l2norm=True, chunk_size=4, return_final_state=True,
                        backend=form)
    assert_close("o", o, torch.cat([o1, o2], 1), rel=1e-12)
    assert_close("state", s, s2, rel=1e-12)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_packed_equals_separate(form):
    lens = [4, 0, 9, 1, 6]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    inp, _ = make_inputs(1, sum(lens), 2, 3, 2)
    init = torch.randn(len(lens), 2, 3, 2, dtype=torch.float64)
    o, s = delta_rule(**inp, use_qk_l2norm=True, chunk_size=4, initial_state=init, return_final_state=True,
                      cu_seqlens=cu, backend=form)
    for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: v[:, a:e] for k, v in inp.items()}
        if a == e:
            assert_close("empty sequence keeps its state", init[i], s[i], rel=0)
            continue
        oi, si = delta_rule(**part, use_qk_l2norm=True, initial_state=init[i : i + 1], return_final_state=True,
                            backend="reference")
        assert_close(f"o of sequence {i}", oi, o[:, a:e], rel=1e-12)
        assert_close(f"state of sequence {i}", si, s[i : i + 1], rel=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_step_repeated_equals_forward(gated):
    inp, kw = make_inputs(2, 11, 3, 4, 5, gated=gated)
    o, s = delta_rule(**inp, **kw, use_qk_l2norm=True, scale=0.5, return_final_state=True)
    state = kw["initial_state"].clone()
    outs = [delta_rule_step(state, **{n: None if t is None else t[:, i] for n, t in inp.items()}, scale=0.5,
                            use_qk_l2norm=True) for i in range(11)]
    assert_close("step outputs", o, torch.stack(outs, 1), rel=1e-12)
    assert_close("step state", s, state, rel=1e-12)
    # T >= 1 tokens per call: 4 + 7 tokens give the same outputs and state
    state2 = kw["initial_state"].clone()
    parts = [delta_rule_step(state2, **{n: None if t is None else t[:, a:e] for n, t in inp.items()}, scale=0.5,
                             use_qk_l2norm=True, backend="reference") for a, e in ((0, 4), (4, 11))]
    assert_close("T-token step outputs", o, torch.cat(parts, 1), rel=1e-12)
    assert_close("T-token step state", s, state2, rel=1e-12)


def test_positional_beta_g_warn_and_still_work():
    inp, kw = make_inputs(1, 6, 2, 3, 3, gated=True)
    want = delta_rule(**inp, use_qk_l2norm=True)
    with pytest.warns(DeprecationWarning, match="beta= and g="):
        got = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], None, True)
    assert_close("positional", want, got, rel=1e-12)
    with pytest.raises(TypeError, match="multiple values"), pytest.warns(DeprecationWarning):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], beta=inp["beta"])
    with pytest.raises(TypeError, match="beta"):
        delta_rule(inp["q"], inp["k"], inp["v"])


def test_registered_forms():
    assert {"reference", "chunked"} <= set(dispatch.available("delta_rule"))


def test_bad_inputs_raise_clear_errors():
    inp, _ = make_inputs(1, 6, 2, 3, 4)
    q, k, v, beta, g = inp.values()
    with pytest.raises(ValueError, match="k must have shape"):
        delta_rule(q, k[..., :2], v, beta=beta)
    with pytest.raises(ValueError, match="v must have shape"):
        delta_rule(q, k, v[:, :, :1], beta=beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule(q, k, v, beta=beta[..., :1])
    with pytest.raises(ValueError, match="g must have shape"):
        delta_rule(q, k, v, beta=beta, g=g[:, :3])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        delta_rule(q, k, v, beta=beta, chunk_size=-1)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        delta_rule(q, k, v, beta=beta, scale=0)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(batch=1, Hv=2, K=3, V=4\)"):
        delta_rule(q, k, v, beta=beta, initial_state=torch.zeros(1, 2, 4, 3, dtype=q.dtype))
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        delta_rule(q[0], k, v, beta=beta)
    with pytest.raises(ValueError, match="cu_seqlens needs batch == 1"):
        delta_rule(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                   beta=beta.expand(2, -1, -1), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="state must have shape"):
        delta_rule_step(torch.zeros(1, 2, 3, 3, dtype=q.dtype), q[:, 0], k[:, 0], v[:, 0], beta=beta[:, 0])


def _grouped(b, l, h, r, dk, dv, seed=3):
    """Inputs with r value heads per query/key head, and the same with q/k repeated per value head."""
    inp, kw = make_inputs(b, l, h * r, dk, dv, seed=seed)
    inp["q"], inp["k"] = inp["q"][:, :, ::r].contiguous(), inp["k"][:, :, ::r].contiguous()
    rep = {**inp, "q": inp["q"].repeat_interleave(r, 2), "k": inp["k"].repeat_interleave(r, 2)}
    return inp, rep, kw


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_grouped_value_heads_equal_repeated_query_key_heads(form):
    inp, rep, kw = _grouped(2, 13, 2, 3, 4, 3)
    wo = torch.randn(2, 13, 6, 3, dtype=torch.float64)

    def run(args):
        leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
        o, s = delta_rule(**leaves, **kw, use_qk_l2norm=True, scale=0.6, chunk_size=4, return_final_state=True,
                          backend=form)
        ((o * wo).sum() + s.square().sum()).backward()
        return o, s, {n: t.grad for n, t in leaves.items()}

    o, s, gr = run(inp)
    o_r, s_r, gr_r = run(rep)
    assert o.shape == (2, 13, 6, 3) and s.shape == (2, 6, 4, 3)
    assert_close("o", o_r, o, rel=1e-12)
    assert_close("state", s_r, s, rel=1e-12)
    for n in ("v", "beta", "g"):
        assert_close(f"d{n}", gr_r[n], gr[n], rel=1e-12)
    for n in ("q", "k"):  # the repeated heads' gradients summed over each group
        assert_close(f"d{n}", gr_r[n].view(2, 13, 2, 3, 4).sum(3), gr[n], rel=1e-12)


def test_grouped_value_heads_step_and_state_batch_indices():
    inp, rep, kw = _grouped(3, 5, 2, 2, 4, 3)
    o, s = delta_rule(**inp, **kw, use_qk_l2norm=True, return_final_state=True, backend="reference")
    pool = torch.randn(5, 4, 4, 3, dtype=torch.float64)
    idx = torch.tensor([4, 0, 2])
    pool[idx] = kw["initial_state"]
    untouched = pool[[1, 3]].clone()
    o_step = delta_rule_step(pool, **inp, use_qk_l2norm=True, state_batch_indices=idx)
    assert_close("grouped step outputs", o, o_step, rel=1e-12)
    assert_close("grouped step states", s, pool[idx], rel=1e-12)
    assert torch.equal(pool[[1, 3]], untouched)
    with pytest.raises(ValueError, match="state_batch_indices must lie in"):
        delta_rule_step(pool, **inp, state_batch_indices=torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"state_batch_indices must have shape \(batch=3,\)"):
        delta_rule_step(pool, **inp, state_batch_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="v must have shape .* multiple of H=2"):
        delta_rule(inp["q"], inp["k"], inp["v"][:, :, :3], beta=inp["beta"][..., :3])
