"""The Triton Mamba-3 sequence form on a CUDA device (marked ``gpu``; skipped without one).

Relative RMS error against float64 (the chunked form on the same inputs, upcast; 1e-5 for float32
inputs, 5e-3 for bfloat16) of the output, the four parts of the final state and every gradient
(inputs, biases, MIMO weights, the initial state), SISO and MIMO at the layer's shapes (P = 64,
N = 128), seqlen 1, seqlens not a multiple of the kernels' chunk, rotating the whole state;
packed sequences with an empty one; no NaN or Inf at 16,384 tokens of strong decay; identical
backward over 3 runs; a ``Mamba3`` layer with the Triton form against the chunked form.

    pytest -q -m gpu tests/gpu/test_mamba3_gpu.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import dispatch
from ssmkit.ops.mamba3 import Mamba3Carry, mamba3
from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

SEQ = ("x", "dt", "dA", "B", "C", "trap", "angles", "z")  # in the input dtype
PARAMS = ("D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")  # float32


def _inputs(b, L, H, P, G, N, S, R, dtype, *, nseq=None, seed=0, strong_decay=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s, scale=1.0):
        return torch.randn(*s, generator=gen, device="cuda") * scale

    rank = () if R is None else (R,)
    dt = F.softplus(rn(b, L, H) - 2.0)
    if strong_decay:  # half the steps forget almost everything, half almost nothing
        dA = torch.where(torch.rand(b, L, H, generator=gen, device="cuda") < 0.5, -30.0, -1e-4)
    else:
        dA = -dt * (torch.rand(b, L, H, generator=gen, device="cuda") * 4 + 1e-4)
    seq = dict(x=rn(b, L, H, P), dt=dt, dA=dA, B=rn(b, L, *rank, G, N), C=rn(b, L, *rank, G, N),
               trap=rn(b, L, H), angles=rn(b, L, H, S), z=rn(b, L, H, P))
    seq = {k: v.to(dtype) for k, v in seq.items()}
    params = dict(D=rn(H), B_bias=rn(H, *rank, N, scale=0.3) + 1, C_bias=rn(H, *rank, N, scale=0.3) + 1)
    if R is not None:
        params.update(mimo_x=rn(H, R, P) / R, mimo_z=rn(H, R, P) + 1, mimo_o=rn(H, R, P) / R)
    n = nseq or b
    state = Mamba3Carry(torch.rand(n, H, S, generator=gen, device="cuda") * 6, rn(n, H, P, N),
                        rn(n, R or 1, H, N), rn(n, H, P))
    return seq, params, state


def _run(form, seq, params, state, pairs, weights, cu=None, cast=None):
    """Output, final state and every gradient; ``weights`` (for y and the state's parts) make the loss."""
    def c(t):
        return t.detach().clone() if cast is None else t.detach().to(cast)

    leaves = {k: c(v).requires_grad_() for k, v in {**seq, **params}.items()}
    st = Mamba3Carry(*(c(t).requires_grad_() for t in state))
    y, fin = mamba3(**leaves, rotary_pairs=pairs, initial_state=st, return_final_state=True, cu_seqlens=cu,
                    backend=form)
    wy, wst = weights
    loss = (y.double() * wy).sum() + sum((torch.sin(a) if i == 0 else a).double().mul(w).sum()
                                         for i, (a, w) in enumerate(zip(fin, wst)))
    grads = torch.autograd.grad(loss, [*leaves.values(), *st])
    names = [*leaves, *(f"state.{f}" for f in Mamba3Carry._fields)]
    return y, fin, dict(zip(names, grads))


def _weights(b, L, H, P, N, S, R, nseq=None):
    gen = torch.Generator(device="cuda").manual_seed(11)
    n = nseq or b

    def rn(*s):
        return torch.randn(*s, generator=gen, device="cuda", dtype=torch.float64)

    return rn(b, L, H, P), [rn(n, H, S), rn(n, H, P, N), rn(n, R or 1, H, N), rn(n, H, P)]


def _check(got, want, tol):
    (y, fin, grads), (y64, fin64, grads64) = got, want
    assert torch.isfinite(y).all()
    assert rel_err(y64, y) <= tol, ("y", rel_err(y64, y))
    d = torch.remainder(fin.angle.double() - fin64.angle + math.pi, 2 * math.pi) - math.pi
    assert d.norm() <= tol * fin64.angle.norm(), ("final angle", (d.norm() / fin64.angle.norm()).item())
    for f in ("ssm", "k", "v"):
        assert rel_err(getattr(fin64, f), getattr(fin, f)) <= tol, (f, rel_err(getattr(fin64, f), getattr(fin, f)))
    for k, g in grads64.items():
        assert torch.isfinite(grads[k]).all(), k
        assert rel_err(g, grads[k]) <= tol, (f"d{k}", rel_err(g, grads[k]))


SHAPES = [  # b, L, H, P, G, N, S, R, rotary_pairs
    (2, 1, 4, 64, 1, 128, 32, None, "interleaved"),
    (2, 333, 8, 64, 2, 128, 32, None, "interleaved"),
    (1, 4097, 4, 64, 1, 128, 64, None, "interleaved"),  # rope_fraction 1
    (2, 257, 4, 64, 1, 128, 32, 4, "halves"),
    (1, 1000, 6, 32, 3, 64, 16, 2, "halves"),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_float64(shape, dtype, tol):
    b, L, H, P, G, N, S, R, pairs = shape
    seq, params, state = _inputs(b, L, H, P, G, N, S, R, dtype)
    w = _weights(b, L, H, P, N, S, R)
    got = _run("triton", seq, params, state, pairs, w)
    assert got[0].dtype == dtype and got[1].ssm.dtype == torch.float32
    want = _run("chunked", seq, params, state, pairs, w, cast=torch.float64)
    _check(got, want, tol)


def test_packed_with_empty_sequence():
    cu = torch.tensor([0, 100, 100, 611, 700], device="cuda", dtype=torch.int32)
    seq, params, state = _inputs(1, 700, 4, 64, 1, 128, 32, None, torch.float32, nseq=4)
    w = _weights(1, 700, 4, 64, 128, 32, None, nseq=4)
    got = _run("triton", seq, params, state, "interleaved", w, cu=cu)
    want = _run("chunked", seq, params, state, "interleaved", w, cu=cu, cast=torch.float64)
    _check(got, want, 1e-5)


@pytest.mark.parametrize("R", [None, 4])
def test_strong_decay_long_sequence_stays_finite(R):
    seq, params, state = _inputs(1, 16384, 2, 64, 1, 128, 32, R, torch.bfloat16, strong_decay=True)
    w = _weights(1, 16384, 2, 64, 128, 32, R)
    y, fin, grads = _run("triton", seq, params, state, "halves" if R else "interleaved", w)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in fin)
    for k, g in grads.items():
        assert torch.isfinite(g).all(), k


def test_backward_is_deterministic():
    seq, params, state = _inputs(2, 777, 8, 64, 1, 128, 32, None, torch.bfloat16)
    w = _weights(2, 777, 8, 64, 128, 32, None)
    runs = [_run("triton", seq, params, state, "interleaved", w)[2] for _ in range(3)]
    for k in runs[0]:
        assert all(torch.equal(runs[0][k], r[k]) for r in runs[1:]), k


@pytest.mark.parametrize("is_mimo", [False, True])
def test_layer_with_triton_form_matches_chunked(is_mimo):
    from ssmkit.layers import Mamba3

    torch.manual_seed(0)
    layer = Mamba3(256, d_state=64, headdim=32, is_mimo=is_mimo, mimo_rank=2, device="cuda")
    u = torch.randn(2, 300, 256, device="cuda")
    gy = torch.randn(2, 300, 256, device="cuda")
    out = {}
    for form in ("triton", "chunked"):
        layer.zero_grad()
        with dispatch.force_backend(form):
            y = layer(u)
        y.backward(gy)
        out[form] = [y, *(p.grad.clone() for p in layer.parameters())]
    for a, b in zip(out["triton"], out["chunked"]):
        assert rel_err(b, a) <= 1e-4, rel_err(b, a)
