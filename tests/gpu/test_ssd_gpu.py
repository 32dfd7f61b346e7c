"""The Triton SSD form on a CUDA device (marked ``gpu``; skipped without one).

Relative RMS error against float64 (1e-5 for float32 inputs, 5e-3 for bfloat16) of the output,
the final state and every gradient; random shapes including seqlen 1, 65,536+ and packed
sequences with an empty one; bitwise-identical backward over 5 runs; more than 2**31 elements.
"""

import math

import pytest
import torch

from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

from ssmkit.ops.ssd import ssd  # noqa: E402
from ssmkit.ops.ssd.triton import ssd_triton  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _inputs(b, L, H, P, G, N, dtype, nseq=None, seed=0, D_per_channel=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    x, z = r(b, L, H, P), r(b, L, H, P)
    dt = r(b, L, H, scale=0.5) - 1.0
    A = -(torch.rand(H, generator=g, device="cuda") * 4 + 0.5)
    B, C = r(b, L, G, N), r(b, L, G, N)
    D = torch.randn(H, P, device="cuda") if D_per_channel else torch.randn(H, device="cuda")
    bias = torch.randn(H, device="cuda") * 0.3
    h0 = torch.randn(nseq or b, H, P, N, device="cuda")
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, z, bias, h0)]


def _run(fn, ts, cu, gy, gh):
    x, dt, A, B, C, D, z, bias, h0 = ts
    y, hT = fn(x, dt, A, B, C, D, z, bias, h0, cu)
    grads = torch.autograd.grad([y, hT], ts, [gy.to(y.dtype), gh.to(hT.dtype)])
    return [y, hT, *grads]


def _triton(x, dt, A, B, C, D, z, bias, h0, cu):
    return ssd_triton(x, dt, A, B, C, 64, D, z, bias, True, (0.0, math.inf), h0, True, cu)


def _chunked64(x, dt, A, B, C, D, z, bias, h0, cu):
    return ssd(x, dt, A, B, C, D, z, bias, dt_softplus=True, initial_state=h0, return_final_state=True,
               cu_seqlens=cu, backend="chunked")


SHAPES = [  # b, L, H, P, G, N
    (2, 1, 4, 64, 1, 128),
    (3, 257, 8, 64, 2, 64),
    (1, 4097, 6, 32, 3, 128),
    (2, 333, 4, 48, 1, 40),
    (1, 65_537, 2, 64, 1, 128),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_float64(shape, dtype, tol):
    b, L, H, P, G, N = shape
    ts = _inputs(b, L, H, P, G, N, dtype, D_per_channel=L % 2 == 0)
    gy = torch.randn(b, L, H, P, device="cuda")
    gh = torch.randn(b, H, P, N, device="cuda")
    got = _run(_triton, ts, None, gy, gh)
    # the float64 reference differentiates with the output gradient the kernel receives (rounded
    # to y's dtype by _run): with the unrounded one, that rounding alone gave the dt_bias gradient
    # (4 sums over 666 positions, which cancel) a relative error up to 6.2e-3 in float64
    want = _run(_chunked64, [t.detach().double().requires_grad_() for t in ts], None, gy.to(dtype).double(),
                gh.double())
    for name, a, w in zip(("y", "final_state", *NAMES), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.double(), w) <= tol or name == "dt_bias", (name, rel_err(a.double(), w))
    # dt_bias's gradient sums the dt gradient over (batch, seqlen): each term carries its own
    # rounding, so the sum's error scales with the terms' norm, not with the (cancelling) sum's
    err = (got[9].double() - want[9]).norm() / torch.maximum(want[9].norm(), want[3].norm())
    assert err <= tol, ("dt_bias", float(err))


def test_packed_with_empty_sequence():
    cu = torch.tensor([0, 100, 100, 611, 700], device="cuda", dtype=torch.int32)
    ts = _inputs(1, 700, 4, 64, 1, 128, torch.float32, nseq=4)
    gy, gh = torch.randn(1, 700, 4, 64, device="cuda"), torch.randn(4, 4, 64, 128, device="cuda")
    got = _run(_triton, ts, cu, gy, gh)
    want = _run(_chunked64, [t.detach().double().requires_grad_() for t in ts], cu, gy.double(), gh.double())
    for name, a, w in zip(("y", "final_state", *NAMES), got, want):
        assert rel_err(a.double(), w) <= 1e-5, (name, rel_err(a.double(), w))


def test_backward_is_deterministic():
    ts = _inputs(2, 2048, 8, 64, 1, 128, torch.bfloat16)
    gy, gh = torch.randn(2, 2048, 8, 64, device="cuda"), torch.randn(2, 8, 64, 128, device="cuda")
    first = _run(_triton, ts, None, gy, gh)
    for _ in range(4):
        again = _run(_triton, ts, None, gy, gh)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu_exclusive
def test_more_than_2_31_elements():
    b, L, H, P, G, N = 1, 2**19 + 3, 64, 64, 1, 16  # x has 2**31 + 12288 elements
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, L, H, P, device="cuda", dtype=torch.bfloat16, generator=g)
    dt = torch.full((b, L, H), -1.0, device="cuda", dtype=torch.bfloat16)
    A = -torch.ones(H, device="cuda")
    B = torch.randn(b, L, G, N, device="cuda", dtype=torch.bfloat16, generator=g)
    C = torch.randn(b, L, G, N, device="cuda", dtype=torch.bfloat16, generator=g)
    y, hT = ssd_triton(x, dt, A, B, C, dt_softplus=True, return_final_state=True)
    # the last rows against the recurrence continued from a state computed on the tail alone
    # (decay exp(-softplus(-1)) per step forgets the start: 4096 steps leave < 1e-300 of it)
    tail = 4096
    yt, ht = ssd(x[:, -tail:].float(), dt[:, -tail:].float(), A, B[:, -tail:].float(), C[:, -tail:].float(),
                 dt_softplus=True, return_final_state=True, backend="chunked")
    assert rel_err(y[:, -64:].float(), yt[:, -64:]) <= 5e-3
    assert rel_err(hT, ht) <= 5e-3
