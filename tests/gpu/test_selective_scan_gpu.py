"""The Triton selective scan on a CUDA device (marked ``gpu``; skipped without one).

Relative RMS error against a float64 reference (1e-5 for float32 inputs, 5e-3 for bfloat16),
random shapes including seqlen 1, 4097 and 65,536+, non-power-of-two dims; NaN-poisoned output
memory; bitwise-identical results across runs; and a tensor of more than 2**31 elements.
"""

import pytest
import torch

from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

ss = pytest.importorskip("ssmkit.ops.selective_scan")
from ssmkit.ops.selective_scan.triton import selective_scan_triton  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _poison_allocator(nbytes=2 << 30):
    """Fill free cached CUDA memory with NaN so that unwritten outputs show up as NaN."""
    t = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    t.fill_(float("nan"))
    del t


def _inputs(bsz, L, dim, N, G, dtype, seed=0, nseq=None, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    x, dt, z = r(bsz, L, dim), r(bsz, L, dim, scale=0.5) - 1.0, r(bsz, L, dim)
    A = -(torch.rand(dim, N, generator=g, device="cuda") * N + 0.5)  # fp32 parameters, as in Mamba
    B, C = r(bsz, L, G, N), r(bsz, L, G, N)
    D, bias = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda") * 0.3
    h0 = torch.randn(nseq or bsz, dim, N, device="cuda")
    ts = [x, dt, A, B, C, D, z, bias, h0]
    if grad:
        ts = [t.requires_grad_() for t in ts]
    return ts


def _ref64(ts, cu=None, long=False):
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in ts]
    backend = "chunked" if long else "reference"
    x, dt, A, B, C, D, z, bias, h0 = t64
    y, hT = ss.selective_scan(x, dt, A, B, C, D, z, bias, dt_softplus=True, initial_state=h0,
                              return_final_state=True, cu_seqlens=cu, backend=backend)
    return t64, y, hT


SHAPES = [  # bsz, L, dim, N, G
    (2, 1, 64, 16, 1),
    (3, 257, 96, 16, 2),
    (1, 4097, 72, 16, 1),
    (2, 333, 40, 7, 1),
    (1, 65_537, 32, 16, 1),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_vs_float64(shape, dtype, tol):
    bsz, L, dim, N, G = shape
    ts = _inputs(bsz, L, dim, N, G, dtype, seed=L + dim, grad=True)
    _poison_allocator()
    y, hT = selective_scan_triton(*ts[:8], True, ts[8], True, None)
    torch.cuda.synchronize()
    assert not y.isnan().any() and not hT.isnan().any()
    t64, yr, hr = _ref64(ts, long=L > 1000)
    assert rel_err(yr, y) <= tol, rel_err(yr, y)
    assert rel_err(hr, hT) <= tol, rel_err(hr, hT)
    gy = torch.randn_like(yr)
    gh = torch.randn_like(hr)
    _poison_allocator()
    grads = torch.autograd.grad((y.double() * gy).sum() + (hT.double() * gh).sum(), ts)
    grads_r = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), t64)
    # gradients pass through bf16 storage of dx, ddt, dz: allow 2x the forward tolerance
    gtol = tol if dtype == torch.float32 else 2 * tol
    for n, a, b in zip(NAMES, grads_r, grads):
        assert not b.isnan().any(), n
        assert rel_err(a, b) <= gtol, (n, rel_err(a, b))


def test_cu_seqlens_vs_float64():
    cu = torch.tensor([0, 1, 700, 700, 2049, 3000], device="cuda", dtype=torch.int32)
    ts = _inputs(1, 3000, 64, 16, 1, torch.float32, nseq=5, grad=True)
    y, hT = selective_scan_triton(*ts[:8], True, ts[8], True, cu)
    t64, yr, hr = _ref64(ts, cu=cu, long=True)
    assert rel_err(yr, y) <= 1e-5 and rel_err(hr, hT) <= 1e-5
    gy = torch.randn_like(yr)
    grads = torch.autograd.grad((y.double() * gy).sum() + hT.double().sum(), ts)
    grads_r = torch.autograd.grad((yr * gy).sum() + hr.sum(), t64)
    for n, a, b in zip(NAMES, grads_r, grads):
        assert rel_err(a, b) <= 1e-5, (n, rel_err(a, b))


def test_bitwise_deterministic():
    ts = _inputs(4, 1000, 256, 16, 1, torch.bfloat16, grad=True)
    outs = []
    for _ in range(5):
        y, hT = selective_scan_triton(*ts[:8], True, ts[8], True, None)
        grads = torch.autograd.grad(y.float().square().sum() + hT.sum(), ts)
        outs.append([y, hT, *grads])
    for run in outs[1:]:
        for a, b in zip(outs[0], run):
            assert torch.equal(a, b)


@pytest.mark.gpu_exclusive
def test_more_than_2_pow_31_elements():
    free, _ = torch.cuda.mem_get_info()
    bsz, L, dim, N = 2, 131_072, 8_200, 16  # 2.15e9 elements per (batch, seqlen, dim) tensor
    need = 4 * bsz * L * dim * 2 + 2 * bsz * L * N * 2
    if free < need * 1.3:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(bsz, L, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    dt = torch.randn(bsz, L, dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.5 - 1
    z = torch.randn(bsz, L, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    A = -(torch.rand(dim, N, device="cuda", generator=g) * N + 0.5)
    B = torch.randn(bsz, L, N, device="cuda", dtype=torch.bfloat16, generator=g)
    C = torch.randn(bsz, L, N, device="cuda", dtype=torch.bfloat16, generator=g)
    D = torch.randn(dim, device="cuda")
    bias = torch.randn(dim, device="cuda") * 0.3
    assert x.numel() > 2**31
    y = selective_scan_triton(x, dt, A, B, C, D, z, bias, True)
    # Channels are independent when G == 1: check the last channels of the last batch row, whose
    # offsets are past 2**31, against float64 on just those channels.
    sl = slice(dim - 40, dim)
    yr = ss.selective_scan(x[1:, :, sl].double(), dt[1:, :, sl].double(), A[sl].double(),
                           B[1:].double(), C[1:].double(), D[sl].double(), z[1:, :, sl].double(),
                           bias[sl].double(), dt_softplus=True, backend="chunked")
    assert rel_err(yr, y[1:, :, sl]) <= 5e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_sequence_parallel_forward_batch1(dtype, tol):
    """Batch-1 shapes leave most of the GPU idle, so the forward splits the sequence into
    segments (decided from the SM count): same results as one pass and as float64."""
    from ssmkit.ops.selective_scan import triton as sst

    ts = _inputs(1, 5000, 256, 16, 1, dtype, seed=7, grad=True)
    cfg = sst.get_config()
    geo = sst._Geometry(ts[0], ts[3], ts[2], None, cfg, cfg.block_d, cfg.chunk)
    assert sst._segments(geo, sst.get_config(), ts[0]) > 1
    y, hT = selective_scan_triton(*ts[:8], True, ts[8], True, None)
    prev = sst.set_config(sst.dataclasses.replace(sst.get_config(), seq_split=1))
    try:
        y1, hT1 = selective_scan_triton(*ts[:8], True, ts[8], True, None)
    finally:
        sst.set_config(prev)
    t64, yr, hr = _ref64(ts, long=True)
    assert rel_err(yr, y) <= tol and rel_err(hr, hT) <= tol
    assert rel_err(y1.double(), y.double()) <= tol
    gy = torch.randn_like(yr)
    grads = torch.autograd.grad((y.double() * gy).sum() + hT.double().sum(), ts)
    grads_r = torch.autograd.grad((yr * gy).sum() + hr.sum(), t64)
    for n, a, b in zip(NAMES, grads_r, grads):
        assert rel_err(a, b) <= 2 * tol, (n, rel_err(a, b))


def _check_with_config(ts, tol, **over):
    """Forward and backward under ScanConfig overrides ``over`` (NaN-poisoned memory first),
    against float64: outputs, final state, every gradient (2x the tolerance: they pass through
    16-bit storage)."""
    from ssmkit.ops.selective_scan import triton as sst

    prev = sst.set_config(sst.dataclasses.replace(sst.get_config(), **over))
    try:
        _poison_allocator()
        y, hT = selective_scan_triton(*ts[:8], True, ts[8], True, None)
        gy = torch.randn_like(y, dtype=torch.float64)
        grads = torch.autograd.grad((y.double() * gy).sum() + hT.double().sum(), ts)
    finally:
        sst.set_config(prev)
    t64, yr, hr = _ref64(ts, long=True)
    assert rel_err(yr, y) <= tol and rel_err(hr, hT) <= tol, (rel_err(yr, y), rel_err(hr, hT))
    grads_r = torch.autograd.grad((yr * gy).sum() + hr.sum(), t64)
    for n, a, b in zip(NAMES, grads_r, grads):
        assert not b.isnan().any(), n
        assert rel_err(a, b) <= 2 * tol, (n, rel_err(a, b))


@pytest.mark.parametrize("bq", [4, 0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_memory_bounded_saved_states(dtype, tol, bq):
    """One saved state per ScanConfig.coarse_blocks backward blocks (forced here; automatic
    beyond ScanConfig.state_mem_limit): the backward recomputes the rest, same accuracy, in the
    split-state backward and in the tile backward (the fallback)."""
    _check_with_config(_inputs(2, 1000, 64, 16, 1, dtype, seed=11, grad=True), tol,
                       state_mem_limit=0, bwd_quad=bq)


@pytest.mark.parametrize("over", [dict(fwd_quad=0), dict(fwd_quad=2), dict(fwd_quad=0, bwd_quad=0)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_forward_variants_vs_float64(over, dtype, tol):
    """The forward kernels besides the default (split-state, Q=4): the tile forward, two lanes
    per channel, and the tile forward with the tile backward; with their backward."""
    _check_with_config(_inputs(3, 1031, 96, 16, 2, dtype, seed=5, grad=True), tol, **over)


@pytest.mark.parametrize("over", [dict(bwd_quad=4), dict(bwd_quad=4, bwd_quad_warps=1),
                                  dict(bwd_quad=2, bwd_quad_warps=2), dict(bwd_quad=1, bwd_quad_warps=1),
                                  dict(bwd_quad_warps=8), dict(bwd_quad_warps=2, bwd_chunk=8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_split_state_backward_vs_float64(over, dtype, tol):
    """The split-state backward (ScanConfig.bwd_quad lanes per channel; W warps per program
    adding their dB, dC sums through the kernel's own shared buffer where it fits, else Triton's
    reduction at every step; 8 warps for blocks of 4 steps, 2 for blocks of 8): every gradient
    against float64, 200 channels (the last program partly empty)."""
    _check_with_config(_inputs(2, 1500, 200, 16, 1, dtype, seed=3, grad=True), tol, **over)


# (expected XW: as kernel_report.py finds Triton 3.6's shared memory for sm_90: W x 1 KB, so
# 2 warps with blocks of 8 fall back; None: not checked)
@pytest.mark.parametrize("over,xw", [(dict(), 1), (dict(bwd_quad_warps=8), 1),
                                     (dict(bwd_quad_warps=2, bwd_chunk=8), 0),
                                     (dict(bwd_quad=8, bwd_chunk=8), None)])
def test_split_state_backward_shared_buffer(monkeypatch, over, xw):
    """The backward's own shared buffer (XW) is used only where it lies
    inside the shared memory Triton gives the kernel (2 halves of K * V * Q / 32 * W * 32
    float32 values), and by default."""
    from ssmkit.ops.selective_scan import triton as sst
    from ssmkit.ops.selective_scan import triton_split_state_bwd

    seen = []
    kernel = triton_split_state_bwd.selective_scan_bwd_quad_kernel

    class _Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw, kernel[grid](*args, **kw)))
                return seen[-1][1]
            return launch

        def warmup(self, *args, **kw):  # (the host's check of the shared buffer's size)
            return kernel.warmup(*args, **kw)

    monkeypatch.setattr(triton_split_state_bwd, "selective_scan_bwd_quad_kernel", _Spy())
    prev = sst.set_config(sst.dataclasses.replace(sst.get_config(), **over))
    try:
        ts = _inputs(2, 300, 256, 16, 1, torch.bfloat16, seed=2, grad=True)
        y = selective_scan_triton(*ts[:8], True)
        y.sum().backward()
    finally:
        sst.set_config(prev)
    (kw, compiled), = seen
    words = 2 * kw["K"] * (kw["V"] * kw["Q"] // 32) * kw["W"] * 32
    assert kw["XW"] == 0 or compiled.metadata.shared >= 4 * words, (compiled.metadata.shared,
                                                                     words)
    if xw is not None:
        assert kw["XW"] == xw
