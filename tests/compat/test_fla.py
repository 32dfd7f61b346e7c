"""ssmkit.compat.fla: flash-linear-attention's signatures, argument order (g before beta), layout, defaults
and options, each checked against the reference recurrence."""

import pytest
import torch

from ssmkit.compat import chunk_gated_delta_rule, fla
from ssmkit.ops import delta_rule
from ssmkit.testing import assert_close


def _inputs(b=2, l=9, h=2, k=4, v=3):
    gen = torch.Generator().manual_seed(0)
    q, kk = (torch.randn(b, l, h, k, generator=gen, dtype=torch.float64) for _ in range(2))
    vv = torch.randn(b, l, h, v, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, k, v, generator=gen, dtype=torch.float64)
    return q, kk, vv, g, beta, s0


def test_positional_g_then_beta_matches_native_keywords():
    q, k, v, g, beta, s0 = _inputs()
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, s0, True, True)
    o_ref, s_ref = delta_rule(q, k, v, beta=beta, g=g, scale=q.shape[-1] ** -0.5, use_qk_l2norm=True,
                              initial_state=s0, return_final_state=True, backend="reference")
    assert_close("o", o_ref, o, rel=1e-10)
    assert_close("final state", s_ref, s, rel=1e-10)
    # the two have the same shape: swapping them gives another result, which is why native is by keyword
    swapped = delta_rule(q, k, v, beta=g.neg().sigmoid(), g=-beta, scale=q.shape[-1] ** -0.5, use_qk_l2norm=True)
    assert (swapped - o).abs().max() > 1e-3


def test_head_first_and_no_final_state():
    q, k, v, g, beta, _ = _inputs()
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.5)
    assert s is None
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o_hf, _ = chunk_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), scale=0.5, head_first=True)
    assert_close("head_first", o, t(o_hf), rel=1e-12)


# fla 0.6's parameters in order, with their defaults (fla/ops/delta_rule/{chunk,fused_recurrent}.py and
# fla/ops/gated_delta_rule/{chunk,fused_recurrent}.py); "**" is fla's **kwargs.
_FLA_SIGNATURES = {
    "chunk_delta_rule": [("q",), ("k",), ("v",), ("beta",), ("scale", None), ("initial_state", None),
                         ("output_final_state", False), ("use_qk_l2norm_in_kernel", False), ("cu_seqlens", None),
                         ("cu_seqlens_cpu", None), ("**",)],
    "chunk_gated_delta_rule": [("q",), ("k",), ("v",), ("g",), ("beta",), ("scale", None), ("initial_state", None),
                               ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                               ("use_beta_sigmoid_in_kernel", False), ("allow_neg_eigval", False),
                               ("state_v_first", False), ("cu_seqlens", None), ("cu_seqlens_cpu", None),
                               ("chunk_indices", None), ("cp_context", None), ("**",)],
    "fused_recurrent_delta_rule": [("q",), ("k",), ("v",), ("beta", None), ("scale", None), ("initial_state", None),
                                   ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                                   ("cu_seqlens", None)],
    "fused_recurrent_gated_delta_rule": [
        ("q",), ("k",), ("v",), ("g", None), ("gk", None), ("gv", None), ("beta", None), ("scale", None),
        ("initial_state", None), ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
        ("use_gate_in_kernel", False), ("A_log", None), ("dt_bias", None), ("use_beta_sigmoid_in_kernel", False),
        ("allow_neg_eigval", False), ("state_v_first", False), ("cu_seqlens", None), ("**",)],
}


@pytest.mark.parametrize("name", sorted(_FLA_SIGNATURES))
def test_signatures_follow_fla(name):
    import inspect

    params = [p for p in inspect.signature(getattr(fla, name)).parameters.values() if p.kind != p.KEYWORD_ONLY]
    got = [("**",) if p.kind == p.VAR_KEYWORD else (p.name,) if p.default is p.empty else (p.name, p.default)
           for p in params]
    assert got == _FLA_SIGNATURES[name]


def _ref(q, k, v, beta, g=None, s0=None, *, scale=None, l2=False, cu=None):
    return delta_rule(q, k, v, beta=beta, g=g, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                      use_qk_l2norm=l2, initial_state=s0, return_final_state=True, cu_seqlens=cu, backend="reference")


def test_defaults_behave_as_fla_documents():
    q, k, v, g, beta, s0 = _inputs()
    o_ref, _ = _ref(q, k, v, beta)
    # scale=None is K^-0.5, no initial state, no final state, no L2 normalisation
    for o, final in (fla.chunk_delta_rule(q, k, v, beta), fla.fused_recurrent_delta_rule(q, k, v, beta)):
        assert final is None
        assert_close("defaults", o_ref, o, rel=1e-10)
    # beta=None is 1 in the fused-recurrent forms; g=None is no decay
    o1, _ = _ref(q, k, v, torch.ones_like(beta))
    assert_close("beta=None", o1, fla.fused_recurrent_delta_rule(q, k, v)[0], rel=1e-10)
    assert_close("beta=None, g=None", o1, fla.fused_recurrent_gated_delta_rule(q, k, v)[0], rel=1e-10)
    # the 7th positional argument of fused_recurrent_gated_delta_rule is beta (after gk, gv)
    o_ref, s_ref = _ref(q, k, v, beta, g, s0, l2=True)
    for o, s in (fla.fused_recurrent_gated_delta_rule(q, k, v, g, None, None, beta, None, s0, True, True),
                 fla.chunk_gated_delta_rule(q, k, v, g, beta, None, s0, True, True)):
        assert_close("o", o_ref, o, rel=1e-10)
        assert_close("final state", s_ref, s, rel=1e-10)
    o_ref, s_ref = _ref(q, k, v, beta, None, s0, l2=True)
    for fn in (fla.chunk_delta_rule, fla.fused_recurrent_delta_rule):
        o, s = fn(q, k, v, beta, None, s0, True, True)
        assert_close(f"{fn.__name__} o", o_ref, o, rel=1e-10)
        assert_close(f"{fn.__name__} final state", s_ref, s, rel=1e-10)


def test_options_grouped_heads_packed_and_state_layout():
    q, k, v, g, beta, s0 = _inputs(b=1, l=12, h=4)
    q, k = q[:, :, :2], k[:, :, :2]  # 2 query/key heads, 4 value heads
    cu = torch.tensor([0, 5, 12])
    s0 = torch.cat([s0, s0.flip(0)])[:2]
    o_ref, s_ref = _ref(q, k, v, beta, g, s0, l2=True, cu=cu)
    sv = s0.transpose(-1, -2).contiguous()
    for fn in (fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule):
        o, s = fn(q, k, v, g=g, beta=beta, initial_state=sv, output_final_state=True, use_qk_l2norm_in_kernel=True,
                  state_v_first=True, cu_seqlens=cu)
        assert_close(f"{fn.__name__} o", o_ref, o, rel=1e-10)
        assert_close(f"{fn.__name__} state (V, K)", s_ref.transpose(-1, -2), s, rel=1e-10)
    # beta as logits (times 2 with allow_neg_eigval); the decay computed from the raw gate
    logit = torch.randn_like(beta)
    A_log, dt_bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    decay = -A_log.exp() * torch.nn.functional.softplus(g + dt_bias)
    o_ref, _ = _ref(q, k, v, 2 * logit.sigmoid(), decay, l2=True)
    o1, _ = fla.chunk_gated_delta_rule(q, k, v, g, logit, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                       allow_neg_eigval=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    o2, _ = fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta=logit, use_qk_l2norm_in_kernel=True,
                                                 use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                                 use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    assert_close("in-kernel gate and beta (chunk)", o_ref, o1, rel=1e-10)
    assert_close("in-kernel gate and beta (fused recurrent)", o_ref, o2, rel=1e-10)


def test_refused_options_raise_clear_errors():
    q, k, v, g, beta, _ = _inputs()
    with pytest.raises(ValueError, match="gk / gv"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, gk=torch.zeros_like(q), beta=beta)
    with pytest.raises(ValueError, match="chunk_size must be 16, 32 or 64"):
        fla.chunk_delta_rule(q, k, v, beta, chunk_size=8)
    with pytest.raises(ValueError, match="allow_neg_eigval=True requires"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fla.chunk_delta_rule(q, k, v, beta, bogus=1)
    with pytest.raises(ValueError, match="multiple of H=2"):
        fla.chunk_gated_delta_rule(q, k, torch.cat([v, v[:, :, :1]], 2), g, beta)
