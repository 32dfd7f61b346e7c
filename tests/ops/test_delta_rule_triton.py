"""The Triton delta-rule forms (``backend="triton"``) against the reference recurrence, under the
Triton CPU interpreter when there is no GPU: outputs, final states and every gradient (q, k, v,
beta, g, initial state) in float64; float32 and float16 against float64; seqlen 1, seqlens not a multiple of
the kernels' chunk, several V blocks, K not a power of two, grouped value heads, packed sequences
with an empty one; the fused recurrent decoding kernel with T >= 1 tokens and state_batch_indices.
Shapes are tiny: the interpreter runs each program in NumPy."""


import pytest
import torch

from ssmkit.ops import dispatch
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step
from ssmkit.testing import assert_close, triton_device
from tests.ops.sm90 import assert_fits_sm90

pytestmark = pytest.mark.triton

pytest.importorskip("triton")

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def _inputs(b, L, h, r, K, V, *, gated=True, init=True, nseq=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r_(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    hv = h * r
    ts = [r_(b, L, h, K), r_(b, L, h, K), r_(b, L, hv, V), torch.rand(b, L, hv, generator=gen, dtype=torch.float64),
          -torch.rand(b, L, hv, generator=gen, dtype=torch.float64) * 2 if gated else None,
          r_(nseq or b, hv, K, V) if init else None]
    return [None if t is None else t.to(dtype).to(triton_device()) for t in ts]


def _run(form, ts, *, l2=True, scale=0.7, cu=None, with_state=True):
    leaves = [None if t is None else t.clone().requires_grad_() for t in ts]
    q, k, v, beta, g, h0 = leaves
    out = delta_rule(q, k, v, beta=beta, g=g, initial_state=h0, scale=scale, use_qk_l2norm=l2,
                     return_final_state=with_state, cu_seqlens=cu, backend=form)
    o, s = out if with_state else (out, None)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
    if s is not None:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)).sum()
    live = [(n, t) for n, t in zip(NAMES, leaves) if t is not None]
    grads = torch.autograd.grad(loss, [t for _, t in live])
    return {"o": o, "final state": s, **{f"d{n}": gr for (n, _), gr in zip(live, grads)}}


def _check(ts, rel=1e-10, reference_ts=None, **kw):
    want = _run("reference", reference_ts or ts, **kw)
    got = _run("triton", ts, **kw)
    for name in want:
        assert_close(name, want[name], got[name], rel=rel)


@pytest.mark.parametrize("case", [
    dict(shape=(1, 70, 1, 1, 16, 16)),  # gated, two chunks, the second partial
    dict(shape=(1, 33, 2, 2, 12, 80), gated=False),  # plain, grouped values, 2 V blocks, K = 12
    dict(shape=(2, 1, 1, 3, 16, 16), init=False, l2=False),  # seqlen 1, no initial state, raw q/k
], ids=["gated", "plain-grouped", "seqlen1"])
def test_against_reference_float64(case):
    case = dict(case)
    shape, l2 = case.pop("shape"), case.pop("l2", True)
    ts = _inputs(*shape, **case)
    if not l2:  # unnormalised keys: keep |k|² β < 2 so the recurrence stays contractive
        ts[1] = ts[1] / ts[1].norm(dim=-1, keepdim=True)
    _check(ts, l2=l2)


def test_packed_sequences_with_an_empty_one():
    cu = torch.tensor([0, 30, 30, 100], device=triton_device())
    _check(_inputs(1, 100, 2, 1, 16, 16, nseq=3), cu=cu)


def test_float32_against_float64_reference():
    ts = _inputs(1, 70, 1, 2, 16, 16, seed=2)
    _check([None if t is None else t.float() for t in ts], rel=1e-5, reference_ts=ts)


def test_half_precision_split_operands():
    """Half-precision inputs take the tensor-core path with computed operands split in two parts
    (float16 here: the interpreter's bfloat16 matmuls are not exact); against float64 on the same
    rounded inputs, the output rounded to float16 included."""
    ts = _inputs(1, 70, 1, 2, 16, 16, seed=5)
    half = [None if t is None else t.to(torch.float16) if i < 4 else t.float() for i, t in enumerate(ts)]
    _check(half, rel=2e-3, reference_ts=[None if t is None else t.double() for t in half])


def test_no_final_state_and_inference():
    ts = _inputs(2, 20, 1, 1, 16, 16, seed=3)
    _check(ts, with_state=False)
    with torch.no_grad():
        o = delta_rule(*ts[:3], beta=ts[3], g=ts[4], initial_state=ts[5], use_qk_l2norm=True, backend="triton")
    want = delta_rule(*ts[:3], beta=ts[3], g=ts[4], initial_state=ts[5], use_qk_l2norm=True, backend="reference")
    assert_close("o without autograd", want, o, rel=1e-10)


@pytest.mark.parametrize("gated", [False, True])
def test_decode_kernel_matches_reference_step(gated):
    q, k, v, beta, g, s0 = _inputs(3, 4, 2, 2, 12, 80, gated=gated, seed=4)
    pool = torch.randn(5, 4, 12, 80, dtype=torch.float64).to(s0)
    idx = torch.tensor([4, 0, 2], device=s0.device)
    pools = {f: pool.clone() for f in ("reference", "triton")}
    outs = {}
    for form, p in pools.items():
        one = delta_rule_step(p, q[:, 0], k[:, 0], v[:, 0], beta=beta[:, 0], g=None if g is None else g[:, 0],
                              scale=0.5, use_qk_l2norm=True, state_batch_indices=idx, backend=form)
        rest = delta_rule_step(p, q[:, 1:], k[:, 1:], v[:, 1:], beta=beta[:, 1:], g=None if g is None else g[:, 1:],
                               scale=0.5, use_qk_l2norm=True, state_batch_indices=idx, backend=form)
        outs[form] = torch.cat([one[:, None], rest], 1)
    assert_close("decode outputs", outs["reference"], outs["triton"], rel=1e-12)
    assert_close("decode states", pools["reference"], pools["triton"], rel=1e-12)
    # the step continues delta_rule: same outputs as the chunked kernels from the same state
    s = s0.clone()
    o = delta_rule_step(s, q, k, v, beta=beta, g=g, scale=0.5, use_qk_l2norm=True, backend="triton")
    o_ref, s_ref = delta_rule(q, k, v, beta=beta, g=g, scale=0.5, use_qk_l2norm=True, initial_state=s0,
                              return_final_state=True, backend="triton")
    assert_close("step == forward", o_ref, o, rel=1e-12)
    assert_close("step state == final state", s_ref, s, rel=1e-12)


def test_registered_but_not_automatic():
    assert "triton" in dispatch.available("delta_rule") and "triton" in dispatch.available("delta_rule_step")
    assert ("delta_rule", "triton") in dispatch._not_auto and ("delta_rule_step", "triton") in dispatch._not_auto


_COMPILE = r'''
import inspect, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssmkit.ops.delta_rule import triton_kernels as kr
half = sys.argv[1] == "bf16"
ptr = "*bf16" if half else "*fp32"
mm = dict(PREC="tf32" if half else "ieee", CDT=tl.float32, MM_DT=tl.bfloat16 if half else tl.float32, SPLIT=half,
          BT=64, BK=128, BV=64)
flags = dict(GATED=True, L2NORM=True, VARLEN=False)
cases = [(kr._dr_fwd, dict(HAS_H0=True, STORE_HT=True, STORE_S=True, **flags, **mm)),
         (kr._dr_bwd_dh, dict(HAS_H0=True, HAS_DHT=True, **flags, **mm)),
         (kr._dr_bwd_chunk, dict(**flags, **{**mm, "BV": 64 if half else 32})),  # as CHUNK_BV_IEEE
         (kr._dr_step, dict(GATED=True, L2NORM=True, HAS_IDX=True, CDT=tl.float32, BK=128, BV=64))]
shared = {}
for fn, consts in cases:
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in consts else (ptr if p.endswith("_ptr") else "fp32" if p == "scale" else "i32")
           for p in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    opts = {"num_warps": 4, "num_stages": 3 if half or fn in (kr._dr_bwd_chunk, kr._dr_step) else 1}  # as ssmkit.ops.delta_rule.triton
    shared[fn.fn.__name__] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
print("SHARED " + json.dumps(shared))
'''


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_within_shared_memory(dtype):
    """The kernels compile for sm_90 (no GPU needed: Triton's NVIDIA backend and ptxas) at the
    benchmark's shapes (K = V = 128) and each fits the H100's 227 KiB of shared memory per block."""
    assert_fits_sm90(_COMPILE, dtype, takes="5-20 minutes uncached")
