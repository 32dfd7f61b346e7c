"""The Triton delta-rule forms on a CUDA device (marked ``gpu``; skipped without one).

Relative RMS error against float64 (the chunked form on the same inputs; 1e-5 for float32 inputs,
5e-3 for bfloat16) of the output, the final state and every gradient, plain and gated, with
grouped value heads, seqlen 1, seqlens not a multiple of the chunk and packed sequences; no NaN
or Inf up to 65,536 tokens with log decays down to -30 per step; bitwise-identical backward over
5 runs; the decoding kernel against the reference step.

    pytest -q -m gpu tests/gpu/test_delta_rule_gpu.py
"""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.delta_rule import delta_rule, delta_rule_step
from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _inputs(b, L, H, r, K, V, dtype, *, gated=True, nseq=None, seed=0, strong_decay=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, device="cuda")

    Hv = H * r
    q, k, v = rn(b, L, H, K).to(dtype), rn(b, L, H, K).to(dtype), rn(b, L, Hv, V).to(dtype)
    beta = torch.rand(b, L, Hv, generator=gen, device="cuda").to(dtype)
    g = None
    if gated and strong_decay:  # half the steps forget almost everything (g = -30), half almost nothing
        g = torch.where(torch.rand(b, L, Hv, generator=gen, device="cuda") < 0.5, -30.0, -1e-4)
    elif gated:
        g = F.logsigmoid(rn(b, L, Hv) + 2.0)
    h0 = rn(nseq or b, Hv, K, V)
    return [None if t is None else t.requires_grad_() for t in (q, k, v, beta, g, h0)]


def _run(form, ts, cu=None, seed=1):
    q, k, v, beta, g, h0 = ts
    o, s = delta_rule(q, k, v, beta=beta, g=g, initial_state=h0, scale=K_SCALE(q), use_qk_l2norm=True,
                      return_final_state=True, cu_seqlens=cu, backend=form)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    go = torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)
    gs = torch.randn(s.shape, generator=gen, device="cuda").to(s.dtype)
    live = [t for t in ts if t is not None]
    return [o, s, *torch.autograd.grad([o, s], live, [go, gs])]


def K_SCALE(q):  # noqa: N802  (the layers' scale)
    return q.shape[-1] ** -0.5


def _float64(ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _compare(ts, tol, cu=None):
    got = _run("triton", ts, cu)
    want = _run("chunked", _float64(ts), cu)
    names = ["o", "final_state", *(n for n, t in zip(NAMES, ts) if t is not None)]
    for name, a, w in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        err = rel_err(w, a.double())
        assert err <= tol, (name, err)


SHAPES = [  # b, L, H, r (value heads per key head), K, V
    (2, 1, 4, 1, 128, 128),
    (2, 333, 4, 2, 128, 128),
    (1, 4097, 2, 1, 64, 128),
    (3, 257, 2, 3, 96, 64),
    (8, 2048, 16, 1, 128, 128),
]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_float64(shape, dtype, tol, gated):
    _compare(_inputs(*shape, dtype, gated=gated), tol)


def test_packed_with_empty_sequence():
    cu = torch.tensor([0, 100, 100, 611, 700], device="cuda", dtype=torch.int32)
    _compare(_inputs(1, 700, 4, 2, 128, 128, torch.float32, nseq=4), 1e-5, cu=cu)


@pytest.mark.gpu_exclusive
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)], ids=["fp32", "bf16"])
def test_65536_tokens_strong_decay(dtype, tol):
    ts = _inputs(1, 65_536, 2, 2, 128, 128, dtype, strong_decay=True)
    _compare(ts, tol)


def test_backward_is_deterministic():
    ts = _inputs(2, 2048, 4, 2, 128, 128, torch.bfloat16)
    first = _run("triton", ts)
    for _ in range(4):
        again = _run("triton", ts)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_decode_kernel_against_reference_step(gated):
    q, k, v, beta, g, _ = (None if t is None else t.detach() for t in _inputs(4, 3, 4, 2, 128, 128, torch.float32,
                                                                              gated=gated))
    pool = torch.randn(9, 8, 128, 128, device="cuda")
    idx = torch.tensor([7, 0, 3, 5], device="cuda")
    pools = {f: pool.clone() for f in ("reference", "triton")}
    outs = {f: delta_rule_step(p, q, k, v, beta=beta, g=g, scale=128 ** -0.5, use_qk_l2norm=True,
                               state_batch_indices=idx, backend=f) for f, p in pools.items()}
    assert rel_err(outs["reference"], outs["triton"]) <= 1e-5
    assert rel_err(pools["reference"], pools["triton"]) <= 1e-5
