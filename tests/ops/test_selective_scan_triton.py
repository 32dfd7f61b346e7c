"""The Triton selective scan (``backend="triton"``) against the reference, under the Triton CPU
interpreter when there is no GPU: outputs, final states and every gradient, in float64."""

import pytest
import torch

from ssmkit.testing import assert_close, triton_device

pytestmark = pytest.mark.triton

triton_mod = pytest.importorskip("ssmkit.ops.selective_scan.triton")
from ssmkit.ops.selective_scan.reference import selective_scan_reference  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _inputs(bsz, L, dim, N, G, dtype, nseq=None, with_opt=True, grouped=True):
    dev = triton_device()
    g = torch.Generator().manual_seed(bsz * 1000 + L * 10 + dim + N)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dev, dtype)

    x, dt, z = r(bsz, L, dim), r(bsz, L, dim, scale=0.5), r(bsz, L, dim)
    A = -(torch.rand(dim, N, generator=g, dtype=torch.float64) + 0.3).to(dev, dtype)
    bc_shape = (bsz, L, G, N) if grouped else (bsz, L, N)
    B, C = r(*bc_shape), r(*bc_shape)
    D, bias = r(dim), r(dim, scale=0.3)
    h0 = r(nseq or bsz, dim, N)
    if not with_opt:
        D = z = bias = h0 = None
    return [x, dt, A, B, C, D, z, bias, h0]


def _run(fn, ts, softplus, cu):
    x, dt, A, B, C, D, z, bias, h0 = ts
    return fn(x, dt, A, B, C, D, z, bias, softplus, h0, True, cu)


def _check(ts, softplus=True, cu=None, rel=1e-10):
    ts = [t.requires_grad_() if t is not None else None for t in ts]
    y, hT = _run(triton_mod.selective_scan_triton, ts, softplus, cu)
    yr, hr = _run(selective_scan_reference, ts, softplus, cu)
    assert_close("y", yr, y, rel=rel)
    assert_close("final_state", hr, hT, rel=rel)
    gy, gh = torch.randn_like(yr), torch.randn_like(hr)
    live = [t for t in ts if t is not None]
    g = torch.autograd.grad((y * gy).sum() + (hT * gh).sum(), live)
    gr = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), live)
    names = [n for n, t in zip(NAMES, ts) if t is not None]
    for n, a, b in zip(names, gr, g):
        assert_close(f"grad {n}", a, b, rel=rel)


TILES = dict(fwd_quad=0, bwd_quad=0)  # the tile forward and the tile backward


@pytest.mark.parametrize(
    "bsz,L,dim,N,G,K,KB",
    [(2, 11, 8, 4, 1, 4, 4), (1, 1, 5, 3, 1, 8, 4), (1, 19, 12, 5, 3, 8, 4),
     (2, 13, 8, 4, 1, 8, 2), (1, 17, 8, 4, 1, 8, 8), (1, 10, 8, 4, 1, 4, 8)],
)
def test_tile_kernels_match_reference_float64(bsz, L, dim, N, G, K, KB):
    """The tile forward and backward. K: forward unroll; KB: backward block = spacing of the
    saved states (the forward saves several per unrolled block when KB divides K, and unrolls
    KB otherwise)."""
    prev = triton_mod.set_config(triton_mod.ScanConfig(block_d=16, chunk=K, bwd_chunk=KB, **TILES))
    try:
        _check(_inputs(bsz, L, dim, N, G, torch.float64))
    finally:
        triton_mod.set_config(prev)


def test_no_optional_inputs_ungrouped_no_softplus():
    _check(_inputs(2, 7, 8, 4, 1, torch.float64, with_opt=False, grouped=False), softplus=False)


def test_cu_seqlens_packed_sequences():
    cu = torch.tensor([0, 3, 3, 13], device=triton_device())  # includes an empty sequence
    _check(_inputs(1, 13, 8, 4, 2, torch.float64, nseq=3), cu=cu)


@pytest.mark.parametrize("M,L,fq,bq,split", [(4, 37, 4, 4, 1), (3, 30, 0, 4, 1), (4, 53, 4, 4, 3),
                                              (16, 9, 4, 4, 1), (2, 21, 4, 0, 1), (3, 30, 0, 0, 1),
                                              (2, 41, 0, 0, 3)])
def test_memory_bounded_saved_states(M, L, fq, bq, split):
    """Beyond state_mem_limit the forward saves one state per M backward blocks and the backward
    recomputes the others (the split-state backward per group; the tile backward by a forward
    pass saving every block): same outputs, final state and gradients as the reference, with
    partial groups and segments, after either forward."""
    cfg = triton_mod.ScanConfig(chunk=8, bwd_chunk=4, state_mem_limit=0, coarse_blocks=M,
                                seq_split=split, fwd_quad=fq, bwd_quad=bq)
    prev = triton_mod.set_config(cfg)
    try:
        ts = _inputs(2, L, 8, 4, 1, torch.float64)
        assert triton_mod._coarse_blocks(cfg, ts[0], ts[2], 2) == M
        _check(ts)
    finally:
        triton_mod.set_config(prev)


def test_memory_bounded_saved_states_packed_and_grouped():
    """The same with packed sequences (empty ones included) and two groups of 32 channels."""
    prev = triton_mod.set_config(triton_mod.ScanConfig(state_mem_limit=0, coarse_blocks=2))
    try:
        cu = torch.tensor([0, 0, 9, 9, 40, 40], device=triton_device())
        _check(_inputs(1, 40, 64, 4, 2, torch.float64, nseq=5), cu=cu)
    finally:
        triton_mod.set_config(prev)


def test_float32_inputs_float32_state():
    ts = _inputs(1, 10, 8, 4, 1, torch.float32)
    y, hT = _run(triton_mod.selective_scan_triton, ts, True, None)
    assert y.dtype == torch.float32 and hT.dtype == torch.float32
    ts64 = [t.double() if t is not None else None for t in ts]
    yr, hr = _run(selective_scan_reference, ts64, True, None)
    assert_close("y", yr, y, rel=1e-5)
    assert_close("final_state", hr, hT, rel=1e-5)


def test_dispatch_and_public_op():
    from ssmkit.ops import dispatch
    from ssmkit.ops.selective_scan import selective_scan

    assert "triton" in dispatch.available("selective_scan")
    ts = _inputs(1, 6, 8, 4, 1, torch.float64)
    x, dt, A, B, C, D, z, bias, h0 = ts
    y = selective_scan(x, dt, A, B, C, D, z, bias, dt_softplus=True, initial_state=h0, backend="triton")
    yr = selective_scan(x, dt, A, B, C, D, z, bias, dt_softplus=True, initial_state=h0, backend="reference")
    assert_close("y", yr, y, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [6, 5])  # even: B, C read two per 32-bit word; odd: one by one
def test_half_inputs_packed_rows(dtype, N):
    """16-bit inputs: the forward unpacks B, C from 32-bit words; compare with the reference on
    the same (rounded) inputs in float64, so only float32 arithmetic separates the two."""
    ts = _inputs(2, 9, 8, N, 1, dtype)
    y, hT = _run(triton_mod.selective_scan_triton, ts, True, None)
    ts64 = [t.double() if t is not None else None for t in ts]
    yr, hr = _run(selective_scan_reference, ts64, True, None)
    assert y.dtype == dtype
    # y itself is rounded to 16 bits (8 mantissa bits for bfloat16, 11 for float16)
    assert_close("y", yr, y.double(), rel=8e-3 if dtype == torch.bfloat16 else 1e-3)
    assert_close("final_state", hr, hT, rel=1e-5)


@pytest.mark.parametrize("N", [4, 5, triton_mod.MAX_STATES_PER_LANE + 1])
def test_tile_forward_kernel(N):
    """The tile forward with the split-state backward, any N (beyond the split-state kernels'
    states per lane, both run the tile kernels)."""
    prev = triton_mod.set_config(triton_mod.ScanConfig(block_d=16, chunk=4, fwd_quad=0))
    try:
        _check(_inputs(1, 6, 8, N, 1, torch.float64))
    finally:
        triton_mod.set_config(prev)


def test_tile_backward_groups_beyond_split_state():
    """Groups of 5 channels: no power-of-two lane split keeps a program's channels in one
    group, so both passes run the tile kernels."""
    cfg = triton_mod.ScanConfig()
    ts = _inputs(1, 10, 10, 17, 2, torch.float64)
    assert triton_mod._bwd_split(cfg, ts[0], ts[3], ts[2]) == (0, 0)
    assert triton_mod._fwd_split(cfg, ts[0], ts[3], ts[2], 4) == (0, 0)
    _check(ts)


def test_half_inputs_gradients():
    """bfloat16 inputs through the packed-row backward: gradients against float64 on the same
    rounded inputs (each gradient is itself rounded to bfloat16)."""
    ts = [t.requires_grad_() if t is not None else None
          for t in _inputs(1, 12, 32, 6, 1, torch.bfloat16)]
    ts64 = [t.detach().double().requires_grad_() if t is not None else None for t in ts]
    y, hT = _run(triton_mod.selective_scan_triton, ts, True, None)
    yr, hr = _run(selective_scan_reference, ts64, True, None)
    gy = torch.randn_like(yr)
    live = [t for t in ts if t is not None]
    live64 = [t for t in ts64 if t is not None]
    g = torch.autograd.grad((y.double() * gy).sum() + hT.double().sum(), live)
    gr = torch.autograd.grad((yr * gy).sum() + hr.sum(), live64)
    for n, a, b in zip(NAMES, gr, g):
        assert_close(f"grad {n}", a, b.double(), rel=2e-2)


@pytest.mark.parametrize("split,bsz,L,dim,N,G,K", [
    (3, 2, 19, 8, 4, 1, 4), (5, 1, 5, 12, 5, 3, 4), (4, 1, 33, 40, 16, 1, 8), (3, 2, 37, 8, 4, 1, 8)])
def test_sequence_parallel_tile_forward(split, bsz, L, dim, N, G, K):
    """Segments scanned in parallel by the tile forward and chained (outputs, final state, and
    the gradients that use the states saved by the segmented pass, through the segmented
    split-state backward where it applies) equal the reference; unrolling K steps and saving
    states every 4."""
    prev = triton_mod.set_config(triton_mod.ScanConfig(chunk=K, seq_split=split, fwd_quad=0))
    try:
        _check(_inputs(bsz, L, dim, N, G, torch.float64))
    finally:
        triton_mod.set_config(prev)


def test_sequence_split_choice():
    """Split only when the GPU would idle: never on CPU tensors unless forced, never with packed
    sequences, at most one segment per block of ``chunk`` tokens."""
    x = torch.zeros(1, 4096, 4096)
    B = torch.zeros(1, 4096, 1, 16)
    A = torch.zeros(4096, 16)
    cfg = triton_mod.ScanConfig()
    geo = triton_mod._Geometry(x, B, A, None, cfg, cfg.block_d, cfg.chunk)
    assert triton_mod._segments(geo, cfg, x) == 1  # CPU: auto never splits
    forced = triton_mod.ScanConfig(seq_split=10_000)
    assert triton_mod._segments(geo, forced, x) == 4096 // cfg.chunk
    cu = torch.tensor([0, 100, 4096])
    geo_v = triton_mod._Geometry(x, B, A, cu, forced, cfg.block_d, cfg.chunk)
    assert triton_mod._segments(geo_v, forced, x) == 1


@pytest.mark.parametrize("dtype,offset", [(torch.float64, 0), (torch.bfloat16, 0),
                                          (torch.bfloat16, 1)])
@pytest.mark.parametrize("fq", [0, 4])  # the tile forward, the split-state forward
def test_strided_z_B_C_views(dtype, offset, fq):
    """z, B and C as slices of one projection output (as in the Mamba layer) are read through
    their row strides; an odd offset makes the 16-bit rows unaligned for paired loads."""
    bsz, L, dim, N = 2, 9, 8, 4
    g = torch.Generator().manual_seed(5)
    dev = triton_device()
    proj = torch.randn(bsz, L, 2 * dim + offset + 2 * N, generator=g, dtype=torch.float64)
    proj = proj.to(dev, dtype)
    z = proj[..., dim:2 * dim]
    B = proj[..., 2 * dim + offset:2 * dim + offset + N]
    C = proj[..., 2 * dim + offset + N:]
    assert not z.is_contiguous() and triton_mod.row_stride(z) == proj.shape[-1]
    x, dt = (torch.randn(bsz, L, dim, generator=g, dtype=torch.float64).to(dev, dtype)
             for _ in range(2))
    A = -(torch.rand(dim, N, generator=g, dtype=torch.float64) + 0.3).to(dev, dtype)
    D = torch.randn(dim, generator=g, dtype=torch.float64).to(dev, dtype)
    prev = triton_mod.set_config(triton_mod.ScanConfig(chunk=4, fwd_quad=fq))
    try:
        y = triton_mod.selective_scan_triton(x, dt, A, B, C, D, z, None, True)
    finally:
        triton_mod.set_config(prev)
    args64 = [t.double() for t in (x, dt, A, B.contiguous(), C.contiguous(), D, z.contiguous())]
    yr = selective_scan_reference(*args64, None, True)
    assert_close("y", yr, y.double(), rel=1e-10 if dtype == torch.float64 else 8e-3)


def test_row_stride():
    t = torch.zeros(3, 5, 10)
    assert triton_mod.row_stride(t) == 10
    assert triton_mod.row_stride(t[..., 2:6]) == 10
    assert triton_mod.row_stride(t.transpose(0, 1)) == -1  # rows not evenly spaced
    assert triton_mod.row_stride(t[..., ::2]) == -1  # inner block not contiguous
    assert triton_mod.row_stride(t[:, :1]) == 50  # one step: rows are the batch
    assert triton_mod.row_stride(torch.zeros(2, 4, 3, 6)[:, :, :, :4]) == -1  # groups not packed


def _quad_calls(monkeypatch, name="selective_scan_fwd_quad_kernel",
                keys=("Q", "K", "KS", "PACK", "VEC")):
    """Record the launches of a split-state kernel (default: the forward's Q, K, KS, PACK, VEC)
    and let them run."""
    from ssmkit.ops.selective_scan import triton_split_state, triton_split_state_bwd

    module = triton_split_state_bwd if "bwd" in name else triton_split_state
    calls = []
    kernel = getattr(module, name)

    class _Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(tuple(kw[k] for k in keys))
                return kernel[grid](*args, **kw)
            return launch

        def warmup(self, *args, **kw):  # (compiles only: on a GPU, the backward's size check)
            return kernel.warmup(*args, **kw)

    monkeypatch.setattr(module, name, _Spy())
    return calls


@pytest.mark.parametrize("Q,K", [(4, 8), (2, 8), (8, 8), (4, 16), (4, 4), (1, 8)])
def test_split_state_forward(monkeypatch, Q, K):
    """The split-state forward (a channel's states over Q lanes): outputs, final state and every
    gradient (through the states it saves) against float64, with a partial last block, a block
    of steps equal to Q, packed sequences with empty ones, groups, segments and memory-bounded
    saving."""
    calls = _quad_calls(monkeypatch)
    cfg = triton_mod.ScanConfig(quad_chunk=K, fwd_quad=Q)
    prev = triton_mod.set_config(cfg)
    try:
        _check(_inputs(2, 21, 8, 8, 1, torch.float64))
        cu = torch.tensor([0, 0, 5, 5, 21, 21], device=triton_device())
        _check(_inputs(1, 21, 64, 8, 2, torch.float64, nseq=5), cu=cu)
        triton_mod.set_config(triton_mod.dataclasses.replace(cfg, seq_split=3))
        _check(_inputs(1, 37, 8, 16, 1, torch.float64))
        triton_mod.set_config(triton_mod.dataclasses.replace(cfg, state_mem_limit=0,
                                                             coarse_blocks=4))
        _check(_inputs(2, 45, 8, 8, 1, torch.float64))
    finally:
        triton_mod.set_config(prev)
    assert {c[0] for c in calls} == {Q} and len(calls) == 5
    assert {c[1] for c in calls} == {max(K, Q)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_state_forward_half_rows(monkeypatch, dtype):
    """16-bit B and C in the split-state forward, read as 32-bit words of two values, against
    float64 on the same rounded inputs."""
    calls = _quad_calls(monkeypatch)
    ts = _inputs(2, 13, 8, 16, 1, dtype)
    y, hT = _run(triton_mod.selective_scan_triton, ts, True, None)
    ts64 = [t.double() if t is not None else None for t in ts]
    yr, hr = _run(selective_scan_reference, ts64, True, None)
    assert_close("y", yr, y.double(), rel=8e-3 if dtype == torch.bfloat16 else 1e-3)
    assert_close("final_state", hr, hT, rel=1e-5)
    # (Q, K, KS, PACK, VEC): 16-bit rows as two words in one 8-byte load
    assert calls == [(4, 16, 8, 2, 2)]


def test_split_state_applicability(monkeypatch):
    """Q: the largest power of two <= the configured one dividing N with at most
    MAX_STATES_PER_LANE states per lane and a program's channels in one group (fewer warps per
    program in the backward first); none: the tile kernels. On a GPU (132 SMs here) the forward
    also leaves to the tile forward what one lane per channel fills."""
    cfg = triton_mod.ScanConfig()

    def fwd(bsz, dim, N, G=1, device="cpu"):
        x = torch.zeros(bsz, 8, dim, device=device)
        return triton_mod._fwd_split(cfg, x, torch.zeros(bsz, 8, G, N, device=device),
                                     torch.zeros(dim, N, device=device), 4)

    def bwd(dim, N, G=1):
        return triton_mod._bwd_split(cfg, torch.zeros(1, 8, dim), torch.zeros(1, 8, G, N),
                                     torch.zeros(dim, N))

    assert fwd(1, 64, 16) == (4, 16) and fwd(1, 64, 6) == (2, 16) and fwd(1, 64, 5) == (1, 16)
    assert fwd(1, 64, 16, G=16) == (0, 0) and fwd(1, 64, 16, G=8) == (4, 16)  # 4 channels a group
    assert fwd(1, 64, 4 * triton_mod.MAX_STATES_PER_LANE + 4) == (0, 0)
    assert bwd(64, 16) == (4, 4) and bwd(64, 6) == (2, 4) and bwd(64, 5) == (1, 4)
    assert bwd(64, 16, G=2) == (4, 4) and bwd(64, 16, G=4) == (4, 2) and bwd(64, 16, G=8) == (4, 1)
    assert bwd(64, 5, G=2) == (1, 1) and bwd(10, 16, G=2) == (0, 0)
    monkeypatch.setattr(triton_mod, "_sm_count", lambda device: 132)
    assert fwd(8, 2048, 16, device="meta") == (4, 16)
    assert fwd(64, 4096, 16, device="meta") == (0, 0)  # 8,192 warps one lane per channel


@pytest.mark.parametrize("Q,KB,fq,W", [(4, 4, 4, 4), (4, 4, 4, 1), (2, 4, 0, 2), (4, 8, 4, 1),
                                       (8, 8, 2, 4), (1, 4, 4, 1)])
def test_split_state_backward(monkeypatch, Q, KB, fq, W):
    """The split-state backward (bwd_quad, W warps per program): every gradient against
    float64, with partial blocks, channels not filling the last program, packed sequences with
    empty ones, groups, segments, no optional inputs, after either forward; with memory-bounded
    saving (one state per M blocks, partial groups, segments of several groups) too; saved
    states laid out (dim, N) when the forward splits the states too and saves one per block.
    (The warps' sums through the kernel's own shared buffer, XW, run on the GPU only:
    tests/gpu.)"""
    calls = _quad_calls(monkeypatch, "selective_scan_bwd_quad_kernel",
                        ("Q", "K", "V", "W", "M", "STATE_DN"))
    cfg = triton_mod.ScanConfig(bwd_chunk=KB, bwd_quad=Q, fwd_quad=fq, bwd_quad_warps=W)
    prev = triton_mod.set_config(cfg)
    try:
        _check(_inputs(2, 11, 40, 8, 1, torch.float64))
        cu = torch.tensor([0, 0, 5, 5, 21, 21], device=triton_device())
        _check(_inputs(1, 21, W * 64 // Q, 16, 2, torch.float64, nseq=5), cu=cu)
        _check(_inputs(2, 7, 8, 8, 1, torch.float64, with_opt=False, grouped=False),
               softplus=False)
        triton_mod.set_config(triton_mod.dataclasses.replace(cfg, seq_split=3))
        _check(_inputs(1, 37, 8, 16, 1, torch.float64))
        triton_mod.set_config(triton_mod.dataclasses.replace(cfg, state_mem_limit=0,
                                                             coarse_blocks=3, seq_split=2))
        _check(_inputs(2, 45, 8, 16, 1, torch.float64))
    finally:
        triton_mod.set_config(prev)
    S = 16 // Q
    assert [c[4] for c in calls] == [1, 1, 1, 1, 3]
    assert {c[:2] + c[3:4] for c in calls} == {(Q, KB, W)}
    assert calls[1][2] == max(2 * S, 32 // Q)  # dB, dC values per step, padded to the channels
    assert {c[5] for c in calls[:4]} == {bool(fq)} and not calls[4][5]


def test_forward_segments(monkeypatch):
    """On a GPU (132 SMs here): batch-1 inference in the split-state forward splits into 8
    segments of at least 256 steps; training and full batches follow the general rule."""
    monkeypatch.setattr(triton_mod, "_sm_count", lambda device: 132)
    cfg = triton_mod.ScanConfig()

    def nseg(bsz, L, dim, quad, save):
        x = torch.zeros(bsz, L, dim, device="meta")
        geo = triton_mod._Geometry(x, torch.zeros(bsz, L, 1, 16, device="meta"), torch.zeros(dim, 16),
                                   None, cfg, 32 // quad if quad else cfg.block_d, 4)
        return triton_mod._forward_segments(geo, cfg, x, quad, save)

    assert nseg(1, 2048, 4096, 4, False) == 8 and nseg(1, 8192, 4096, 4, False) == 8
    assert nseg(1, 1024, 4096, 4, False) == 4 and nseg(1, 200, 4096, 4, False) == 1
    assert nseg(8, 2048, 2048, 4, False) == 1  # 2,048 programs: the GPU is full
    assert nseg(1, 2048, 4096, 4, True) > 1  # training: the backward's rule


def test_config_from_environment_text():
    cfg = triton_mod.parse_config("bwd_quad=0, seq_split=3")
    assert cfg.bwd_quad == 0 and cfg.seq_split == 3 and cfg.fwd_quad == triton_mod.ScanConfig().fwd_quad
    assert triton_mod.parse_config("") == triton_mod.ScanConfig()
    with pytest.raises(ValueError, match="name=value"):
        triton_mod.parse_config("bwd_quad")
    with pytest.raises(ValueError, match="name=value"):
        triton_mod.parse_config("nope=1")
    with pytest.raises(ValueError, match="bwd_quad must be an integer"):
        triton_mod.parse_config("bwd_quad=four")


def test_split_state_backward_half_inputs():
    """bfloat16 inputs through the split-state backward (B, C rows read as words)."""
    prev = triton_mod.set_config(triton_mod.ScanConfig(bwd_quad=4))
    try:
        ts = [t.requires_grad_() if t is not None else None
              for t in _inputs(1, 12, 32, 16, 1, torch.bfloat16)]
        y, hT = _run(triton_mod.selective_scan_triton, ts, True, None)
        gy = torch.randn(y.shape, dtype=torch.float64, device=y.device)
        g = torch.autograd.grad((y.double() * gy).sum() + hT.double().sum(), ts)
    finally:
        triton_mod.set_config(prev)
    ts64 = [t.detach().double().requires_grad_() if t is not None else None for t in ts]
    yr, hr = _run(selective_scan_reference, ts64, True, None)
    gr = torch.autograd.grad((yr * gy).sum() + hr.sum(), ts64)
    for n, a, b in zip(NAMES, gr, g):
        assert_close(f"grad {n}", a, b.double(), rel=2e-2)


def test_backward_one_token():
    """A single token (one row: arguments equal to 1 become compile-time constants)."""
    _check(_inputs(1, 1, 8, 4, 1, torch.float64))
