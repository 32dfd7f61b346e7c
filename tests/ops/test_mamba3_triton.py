"""The Triton Mamba-3 forms (``backend="triton"``) against the reference, under the Triton CPU
interpreter when there is no GPU.

The decode step: outputs and every part of the state, in float64, SISO and MIMO, both rotary
layouts, grouped B/C, T = 1 and T > 1 tokens, with and without biases. The sequence form (the
chunked scan's kernels): outputs, final states and every gradient (inputs, biases, MIMO weights,
the initial state) in float64, SISO and MIMO, seqlen 1 and seqlens that do not fill the last
chunk, with and without options and an initial state, packed sequences with an empty one; float32
and half precision against the float64 reference."""

import math

import pytest
import torch

from ssmkit.ops import dispatch
from ssmkit.ops.mamba3 import Mamba3Carry, mamba3, mamba3_step
from ssmkit.testing import assert_close, rel_err, triton_device
from tests.ops.sm90 import assert_fits_sm90
from tests.ops.test_mamba3 import CASES, make_inputs

pytestmark = pytest.mark.triton
pytest.importorskip("triton")


@pytest.mark.parametrize("r,pairs,g", CASES)
@pytest.mark.parametrize("T", [1, 4])
def test_triton_step_matches_reference(r, pairs, g, T):
    dev = triton_device()
    inp, kw, st = make_inputs(2, T, g=g, r=r, n=12, s=3)
    if T == 1:
        kw.update(B_bias=None, z=None, mimo_z=None)
    inp = {k: v.to(dev) for k, v in inp.items()}
    kw = {k: None if v is None else v.to(dev) for k, v in kw.items()}
    st = Mamba3Carry(*(t.to(dev) for t in st))
    ref, ref_st = mamba3(**inp, **kw, rotary_pairs=pairs, initial_state=st, return_final_state=True,
                         backend="reference")
    state = Mamba3Carry(*(t.clone() for t in st))
    y = mamba3_step(state, **inp, **kw, rotary_pairs=pairs, backend="triton")
    assert_close("y", ref, y, 1e-12)
    for f in ("ssm", "k", "v"):
        assert_close(f, getattr(ref_st, f), getattr(state, f), 1e-12)
    d = torch.remainder(state.angle - ref_st.angle + math.pi, 2 * math.pi) - math.pi
    assert d.abs().max().item() <= 1e-12


# --- the sequence form (chunked scan kernels): outputs, final states and every gradient -------

def _leaves(inp, kw, st):
    leaves = {k: v.clone().requires_grad_(True) for k, v in {**inp, **kw}.items() if v is not None}
    st = None if st is None else Mamba3Carry(*(t.clone().requires_grad_(True) for t in st))
    return leaves, st


def _run(form, inp, kw, st, pairs, wy=None, wst=None, cu=None):
    """Outputs, the final state and the gradients of every input of ``form`` (weights ``wy``,
    ``wst`` for the loss; drawn from the first call when None)."""
    leaves, st0 = _leaves(inp, kw, st)
    args = {k: leaves.get(k) for k in (*inp, *kw)}
    y, fin = mamba3(**args, rotary_pairs=pairs, initial_state=st0, return_final_state=True, cu_seqlens=cu,
                    backend=form)
    if wy is None:
        gen = torch.Generator().manual_seed(5)
        wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
        wst = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(y.device) for t in fin]
    # (the angle enters through sin: a loss that does not depend on where it is wrapped)
    loss = (y.double() * wy).sum() + sum((torch.sin(a) if i == 0 else a).double().mul(w).sum()
                                         for i, (a, w) in enumerate(zip(fin, wst)))
    names = list(leaves) + ([f"state.{f}" for f in st0._fields] if st0 is not None else [])
    tensors = list(leaves.values()) + (list(st0) if st0 is not None else [])
    grads = torch.autograd.grad(loss, tensors)
    return y, fin, dict(zip(names, grads)), wy, wst


def _compare(inp, kw, st, pairs, rel, cu=None, ref_inputs=None):
    ref_inputs = ref_inputs or (inp, kw, st)
    ref = _run("reference", *ref_inputs, pairs, cu=cu)
    y, fin, grads, _, _ = _run("triton", inp, kw, st, pairs, ref[3], ref[4], cu=cu)
    assert_close("y", ref[0], y, rel)
    assert_close("final angle", torch.zeros_like(ref[1].angle),
                 torch.remainder(fin.angle - ref[1].angle + math.pi, 2 * math.pi) - math.pi, atol=rel * 10)
    for f in ("ssm", "k", "v"):
        assert_close(f"final {f}", getattr(ref[1], f), getattr(fin, f), rel)
    assert set(grads) == set(ref[2])
    for k, g in ref[2].items():
        assert_close(f"d{k}", g, grads[k], rel)


def _to(dev, inp, kw, st, dtype=None):
    def cv(t):
        return None if t is None else t.to(dev, dtype if dtype is not None and t.is_floating_point() else t.dtype)

    return ({k: cv(v) for k, v in inp.items()}, {k: cv(v) for k, v in kw.items()},
            None if st is None else Mamba3Carry(*(cv(t) for t in st)))


# (R, rotary_pairs, G, seqlen): each crosses chunks of 64 rows (64 // R tokens), not evenly
SEQ_CASES = [(None, "interleaved", 1, 70), (None, "halves", 2, 1), (2, "interleaved", 1, 50), (3, "halves", 2, 45)]


@pytest.mark.parametrize("r,pairs,g,l", SEQ_CASES)
def test_triton_scan_matches_reference_float64(r, pairs, g, l):
    inp, kw, st = _to(triton_device(), *make_inputs(2, l, g=g, r=r, p=5, n=12, s=3, seed=l))
    _compare(inp, kw, st, pairs, 1e-10)


@pytest.mark.parametrize("r", [None, 2])
def test_triton_scan_without_options_or_initial_state(r):
    inp, kw, _ = make_inputs(1, 67, r=r, p=4, n=16, s=8, z=False, init=False, seed=3)
    kw.update(D=None, B_bias=None, C_bias=None, mimo_o=None)
    inp, kw, _ = _to(triton_device(), inp, kw, None)
    _compare(inp, kw, None, "interleaved", 1e-10)


def test_triton_scan_packed_sequences():
    cu = torch.tensor([0, 30, 30, 95, 101], dtype=torch.int32)
    inp, kw, _ = make_inputs(1, 101, p=3, n=8, s=2, init=False, seed=4)
    st = make_inputs(4, 1, p=3, n=8, s=2, seed=5)[2]
    inp, kw, st = _to(triton_device(), inp, kw, st)
    _compare(inp, kw, st, "interleaved", 1e-10, cu=cu.to(triton_device()))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_triton_scan_lower_precision_against_float64(dtype, rel):
    """float32 and bfloat16 inputs (float32 operands and states; 3xTF32 matmuls on a GPU, which
    the interpreter computes in float32) against the float64 reference on the same (rounded)
    inputs: outputs, final states, every gradient (bfloat16: about 3e-3 from rounding the
    output and the gradients reaching it to bfloat16)."""
    inp, kw, st = make_inputs(2, 70, h=2, p=8, n=16, s=4, r=2, seed=6)
    low = _to(triton_device(), inp, kw, None, dtype)
    low = (low[0], {k: None if v is None else v.float() for k, v in low[1].items()},
           _to(triton_device(), {}, {}, st, torch.float32)[2])
    ref = ({k: v.double() for k, v in low[0].items()}, {k: None if v is None else v.double() for k, v in low[1].items()},
           Mamba3Carry(*(t.double() for t in low[2])))
    r = _run("reference", *ref, "halves")
    y, fin, grads, _, _ = _run("triton", *low, "halves", r[3], r[4])
    assert y.dtype == dtype and fin.ssm.dtype == torch.float32
    assert rel_err(r[0], y) <= rel
    for f in ("ssm", "k", "v"):
        assert rel_err(getattr(r[1], f), getattr(fin, f)) <= rel, f
    for k, g in r[2].items():
        assert rel_err(g, grads[k]) <= rel, (k, rel_err(g, grads[k]))


def test_triton_scan_rejects_more_ranks_than_a_chunk_has_rows():
    inp, kw, _ = make_inputs(1, 2, h=1, p=2, n=4, s=1, r=65, z=False, init=False)
    with pytest.raises(ValueError, match="R <= 64"):
        mamba3(**inp, **kw, backend="triton")


def test_triton_scan_registered_but_not_automatic():
    assert "triton" in dispatch.available("mamba3")
    assert ("mamba3", "triton") in dispatch._not_auto



def test_scan_op_passes_opcheck():
    """``ssmkit::mamba3_scan``: schema, fake (meta) implementation and autograd registration."""
    dev = triton_device()
    gen = torch.Generator().manual_seed(0)
    b, L, R, H, N, P = 2, 40, 2, 3, 16, 8

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dev)

    def u(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64).to(dev)

    args = [r(b, L, R, H, N), r(b, L, R, H, N), r(b, L, R, H, P), -u(b, L, H), u(b, L, H), u(b, L, H), r(b, H, P, N)]
    torch.library.opcheck(torch.ops.ssmkit.mamba3_scan.default, [a.requires_grad_() for a in args] + [False])


@pytest.mark.slow
def test_triton_form_compiles_without_graph_breaks():
    inp, kw, st = _to(triton_device(), *make_inputs(2, 40, r=2, p=5, n=12, s=3))

    def f(inp, kw, st):
        y, fin = mamba3(**inp, **kw, initial_state=st, return_final_state=True, backend="triton")
        return y.square().sum() + fin.ssm.sum()

    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    want = torch.autograd.grad(f(leaves, kw, st), list(leaves.values()))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(leaves, kw, st), list(leaves.values()))
    for k, a, b in zip(leaves, want, got):
        assert_close(f"d{k}", a, b, 1e-10)


_COMPILE = r'''
import inspect, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssmkit.ops.mamba3 import triton_chunk as kr
from ssmkit.ops.mamba3.triton import BLOCK_M, BWD_WARPS, FWD_WARPS
blk = dict(IEEE=sys.argv[1] == "ieee", CDT=tl.float32, BLOCK_M=BLOCK_M, BLOCK_N=128, BLOCK_P=64)
cases = [(kr._m3_states, dict(WITH_DY=True, **blk), FWD_WARPS), (kr._m3_out, blk, FWD_WARPS),
         (kr._m3_bwd, blk, BWD_WARPS), (kr._m3_pass, dict(REVERSE=True, CDT=tl.float32, BLOCK=1024), 4)]
shared = {}
for fn, consts, warps in cases:
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in consts else ("*fp32" if p.endswith("_ptr") else "i32") for p in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    shared[fn.fn.__name__] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                            options={"num_warps": warps}).metadata.shared
print("SHARED " + json.dumps(shared))
'''


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["tf32x3", "ieee"])
def test_scan_kernels_compile_for_hopper_within_shared_memory(prec):
    """The scan kernels compile for sm_90 (Triton's NVIDIA backend and ptxas, no GPU needed) at the
    layer's shapes (P = 64, N = 128, blocks of 64 rows), 3xTF32 (half inputs) and IEEE (float32
    inputs), and each fits the H100's 227 KiB of shared memory per block."""
    assert_fits_sm90(_COMPILE, prec, takes="a minute")
