"""torch.library custom ops: values and gradients equal the plain forms, and a module built on
them compiles with ``torch.compile(fullgraph=True)`` (no graph breaks) on the CPU forms."""

import pytest
import torch

from ssmkit.ops import custom_ops
from ssmkit.ops.conv.causal_conv1d import causal_conv1d_reference
from ssmkit.ops.selective_scan.reference import selective_scan_reference
from ssmkit.testing import assert_close


def _scan_inputs(bsz=2, L=9, dim=6, N=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return [r(bsz, L, dim), r(bsz, L, dim) * 0.5, -torch.rand(dim, N, generator=g, dtype=dtype),
            r(bsz, L, N), r(bsz, L, N), r(dim), r(bsz, L, dim), r(dim), r(bsz, dim, N)]


def _check_scan_op(backend, **shape):
    """The scan op's outputs, final state and every gradient against the reference (float64)."""
    ts = [t.requires_grad_() for t in _scan_inputs(**shape)]
    x, dt, A, B, C, D, z, bias, h0 = ts
    y, hT = custom_ops.selective_scan(x, dt, A, B, C, D, z, bias, True, h0, True, backend=backend)
    yr, hr = selective_scan_reference(x, dt, A, B, C, D, z, bias, True, h0, True)
    assert_close("y", yr, y, rel=1e-10)
    assert_close("hT", hr, hT, rel=1e-10)
    g1 = torch.autograd.grad(y.square().sum() + hT.sum(), ts)
    g2 = torch.autograd.grad(yr.square().sum() + hr.sum(), ts)
    for a, b in zip(g2, g1):
        assert_close("grad", a, b, rel=1e-9)


def test_scan_op_matches_reference_with_grads():
    _check_scan_op("chunked")


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=pytest.mark.triton)])
def test_ssd_op_matches_reference_with_grads(backend):
    """The SSD op (the CPU form's backward by autograd, the Triton form's by its kernels):
    output, final state and every gradient against the reference recurrence, float64."""
    from ssmkit.ops.ssd import ssd

    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ts = [r(2, 70, 4, 8), r(2, 70, 4) * 0.5 - 1, -torch.rand(4, generator=g, dtype=torch.float64) - 0.1,
          r(2, 70, 2, 16), r(2, 70, 2, 16), r(4), r(2, 70, 4, 8), r(4) * 0.1, r(2, 4, 8, 16)]
    ts = [t.requires_grad_() for t in ts]
    x, dt, A, B, C, D, z, bias, h0 = ts
    kw = dict(dt_softplus=True, initial_state=h0, return_final_state=True)
    y, hT = custom_ops.ssd(x, dt, A, B, C, D, z, bias, backend=backend, **kw)
    yr, hr = ssd(x, dt, A, B, C, D, z, bias, backend="reference", **kw)
    assert_close("y", yr, y, rel=1e-10)
    assert_close("hT", hr, hT, rel=1e-10)
    for a, b in zip(torch.autograd.grad(yr.square().sum() + hr.sum(), ts),
                    torch.autograd.grad(y.square().sum() + hT.sum(), ts)):
        assert_close("grad", a, b, rel=1e-9)


def test_conv_op_matches_reference_with_grads():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    y, f = custom_ops.causal_conv1d(x, w, b, "silu", None, True, backend="reference")
    yr, fr = causal_conv1d_reference(x, w, b, "silu", None, True)
    assert_close("y", yr, y, rel=1e-12)
    assert_close("f", fr, f, rel=1e-12)
    g1 = torch.autograd.grad(y.square().sum() + f.sum(), (x, w, b))
    g2 = torch.autograd.grad(yr.square().sum() + fr.sum(), (x, w, b))
    for a, c in zip(g2, g1):
        assert_close("grad", a, c, rel=1e-10)


class _TinyMamba(torch.nn.Module):
    """Conv + selective scan, the Mamba mixer's core, on the custom ops."""

    def __init__(self, dim=8, N=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, 4))
        self.proj = torch.nn.Linear(dim, 2 * N + dim)
        self.A_log = torch.nn.Parameter(torch.zeros(dim, N))
        self.D = torch.nn.Parameter(torch.ones(dim))
        self.N = N

    def forward(self, x):
        u = custom_ops.causal_conv1d(x, self.w, None, "silu", backend="chunked")
        dt, B, C = self.proj(u).split([u.shape[-1], self.N, self.N], dim=-1)
        return custom_ops.selective_scan(u, dt, -torch.exp(self.A_log), B, C, self.D, x,
                                         None, True, backend="chunked")


def test_fullgraph_compile_no_graph_breaks():
    torch._dynamo.reset()
    m = _TinyMamba()
    x = torch.randn(2, 12, 8)
    ref = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close("compiled", ref, out, rel=1e-6)
    out.sum().backward()  # the autograd formula traces too
    assert m.A_log.grad is not None and torch.isfinite(m.A_log.grad).all()


@pytest.mark.parametrize("fn", ["selective_scan", pytest.param("selective_scan_triton", marks=pytest.mark.triton),
                                "causal_conv1d", "ssd", pytest.param("ssd_triton", marks=pytest.mark.triton),
                                "delta_rule", pytest.param("delta_rule_triton", marks=pytest.mark.triton)])
def test_opcheck(fn):
    """Schema and fake (meta) implementation; for the Triton form with saved states, the fake
    knows their shape (packed sequences too: an upper bound from shapes alone)."""
    if fn.startswith("selective_scan"):
        triton = fn.endswith("triton")
        cu = torch.tensor([0, 2, 5]) if triton else None
        args = tuple(_scan_inputs(1, 5, 4, 2)[:8]) + (None, cu, True, "triton" if triton else "chunked", triton, -1)
        op = torch.ops.ssmkit.selective_scan.default
    elif fn.startswith("ssd"):
        triton = fn.endswith("triton")
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        cu = torch.tensor([0, 2, 5]) if triton else None
        args = (r(1, 5, 2, 4), r(1, 5, 2), -torch.rand(2, dtype=torch.float64), r(1, 5, 1, 8), r(1, 5, 1, 8),
                r(2), r(1, 5, 2, 4), r(2), r(2 if triton else 1, 2, 4, 8), cu, 64, True, 0.0, float("inf"),
                "triton" if triton else "chunked")
        op = torch.ops.ssmkit.ssd.default
    elif fn.startswith("delta_rule"):
        triton = fn.endswith("triton")
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        cu = torch.tensor([0, 2, 5]) if triton else None
        args = (r(1, 5, 1, 4), r(1, 5, 1, 4), r(1, 5, 2, 3), torch.rand(1, 5, 2, dtype=torch.float64),
                -torch.rand(1, 5, 2, dtype=torch.float64), r(2 if triton else 1, 2, 4, 3), cu, 0.5, True, 64,
                "triton" if triton else "chunked")
        op = torch.ops.ssmkit.delta_rule.default
    else:
        args = (torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                None, None, None, True, "reference")
        op = torch.ops.ssmkit.causal_conv1d.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.triton
def test_scan_op_triton_backward_reads_saved_states(monkeypatch):
    """The Triton form as a custom op: values and every gradient equal the reference, and the
    backward op runs the Triton backward on the states the forward op saved (one forward pass
    per training step, not two); also with memory-bounded saving (coarse states)."""
    from ssmkit.ops.selective_scan import triton as sst

    calls = []
    real = sst._forward
    # (argument 12 of _forward: save_states)
    monkeypatch.setattr(sst, "_forward", lambda *a, **k: calls.append(a[12]) or real(*a, **k))
    for over in ({}, {"state_mem_limit": 0, "coarse_blocks": 2}):
        prev = sst.set_config(sst.dataclasses.replace(sst.get_config(), **over))
        try:
            calls.clear()
            _check_scan_op("triton", L=21, dim=8, N=4)
            assert calls == [True]  # one forward, saving states
        finally:
            sst.set_config(prev)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("pattern", ["MM", "22"])
def test_lm_compiles_fullgraph_on_the_triton_forms(pattern):
    """A Mamba (Mamba-2) language model on the Triton forms (the interpreter on CPU) compiles
    with fullgraph=True: the layer calls the scan (SSD) and the conv as torch.library ops. Same
    loss and gradients as eager. (About 9 s each on 2 cores, most of it compiling: the tests of a
    whole model under torch.compile with the GPU code path.)"""
    import ssmkit
    from ssmkit.ops.dispatch import force_backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig(d_model=16, n_layer=2, vocab_size=40, layer_pattern=pattern,
                                                ssm_cfg={"d_state": 4},
                                                mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8}))
    ids = torch.randint(0, 40, (2, 12))
    with force_backend("triton"):
        ref = m(ids, labels=ids).loss
        ref_grads = torch.autograd.grad(ref, list(m.parameters()))
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss
        grads = torch.autograd.grad(out, list(m.parameters()))
    assert_close("loss", ref, out, rel=1e-6)
    for a, b in zip(ref_grads, grads):
        assert_close("grad", a, b, rel=1e-5)


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=pytest.mark.triton)])
def test_delta_rule_op_matches_reference_with_grads(backend):
    """The delta-rule op (grouped value heads, gated, L2 norm, initial state): output, final state
    and every gradient against the reference recurrence, float64; and it compiles fullgraph."""
    from ssmkit.ops.delta_rule import delta_rule

    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ts = [r(1, 20, 1, 16), r(1, 20, 1, 16), r(1, 20, 2, 16), torch.rand(1, 20, 2, generator=g, dtype=torch.float64),
          -torch.rand(1, 20, 2, generator=g, dtype=torch.float64), r(1, 2, 16, 16)]
    ts = [t.requires_grad_() for t in ts]
    q, k, v, beta, gate, h0 = ts
    kw = dict(beta=beta, g=gate, scale=0.5, use_qk_l2norm=True, initial_state=h0, return_final_state=True)
    o, hT = custom_ops.delta_rule(q, k, v, backend=backend, **kw)
    o_r, h_r = delta_rule(q, k, v, backend="reference", **kw)
    assert_close("o", o_r, o, rel=1e-10)
    assert_close("hT", h_r, hT, rel=1e-10)
    for a, b in zip(torch.autograd.grad(o_r.square().sum() + h_r.sum(), ts),
                    torch.autograd.grad(o.square().sum() + hT.sum(), ts)):
        assert_close("grad", a, b, rel=1e-9)
    if backend == "chunked":
        compiled = torch.compile(lambda *a: custom_ops.delta_rule(*a[:3], backend=backend, **kw),
                                 fullgraph=True, backend="aot_eager")
        assert_close("compiled", o_r, compiled(q, k, v)[0], rel=1e-10)
