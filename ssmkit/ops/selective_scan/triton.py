"""``backend="triton"`` form of :func:`ssmkit.ops.selective_scan` (an ``autograd.Function``).

Same signature and results as the ``reference`` form::

    selective_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                          initial_state=None, return_final_state=False, cu_seqlens=None)

* ``x, dt, z``: ``(batch, seqlen, dim)``; ``A``: ``(dim, N)``; ``B, C``: ``(batch, seqlen, N)`` or
  ``(batch, seqlen, G, N)``; ``D, dt_bias``: ``(dim,)``; ``initial_state``: ``(batch, dim, N)``
  (``(num_seqs, dim, N)`` with ``cu_seqlens``). Returns ``y`` ``(batch, seqlen, dim)`` in ``x``'s
  dtype and, with ``return_final_state``, the float32 final state ``(batch | num_seqs, dim, N)``.

The kernels (``triton_kernels.py``) fuse softplus(dt + dt_bias), the discretization, the scan with
the state on chip, C·h, D·x and the z gate; the backward recomputes states from block boundaries
saved every ``K`` tokens instead of storing the expanded state. Float16/bfloat16/float32 inputs are
computed in float32; float64 inputs in float64 (so tests can compare to 1e-10). ``z``, ``B`` and ``C``
may be views with evenly spaced rows (slices of a projection), read in place by the forward. When
the batch is too small to fill the GPU, the sequence is cut into segments scanned in parallel and
chained (:func:`_segments`), forward and backward.

This module imports without Triton; the kernels are imported on first use. Importing it registers
the form with :mod:`ssmkit.ops.dispatch` under ``("selective_scan", "triton")``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.selective_scan._common import compute_dtype

__all__ = ["ScanConfig", "selective_scan_triton", "set_config", "get_config"]


@dataclasses.dataclass
class ScanConfig:
    """Launch parameters. ``chunk`` (tokens per unrolled block, also the spacing of the states saved
    for the backward) is shared by forward and backward; the rest can differ per pass."""

    # `benchmarks/selective_scan_gpu.py --sweep` retunes; results in docs/benchmarks/.
    block_d: int = 32
    chunk: int = 8
    num_warps: int = 1
    bwd_block_d: int = 16
    bwd_num_warps: int = 1
    keep_decay: int = 0  # backward keeps exp(ΔA) of a block in registers (1) or recomputes it (0)
    load_group: int = 4  # forward: steps whose inputs are loaded ahead together (divides chunk)
    # forward kernel: 1 = one lane per channel, states as N vectors (N <= LANES_MAX_N);
    # 0 = (N, block_d) tiles (any N). H100, 2026-11-27, B8 D2048 N16 L2048 bf16: 0.737 ms
    # against 0.699 ms for the tiles, so the tiles are the default.
    fwd_lanes: int = 0
    # backward kernel: 1 = one lane per channel with a warp reduce-scatter for dB/dC (blocks of
    # exactly 32 channels: dim, or dim/G with groups, a multiple of 32; N <= LANES_MAX_N);
    # 0 = (N, bwd_block_d) tiles
    bwd_lanes: int = 1
    # segments of the sequence scanned in parallel, forward and lanes backward (0 = when the GPU
    # would otherwise idle, 1 = never, S > 1 = S segments); see _segments
    seq_split: int = 0
    # tile forward: carry the next block's first loads across the loop (the (N, block_d) tile
    # also stores a block's outputs after them); untimed for the (block_d, N) tile
    fwd_pipeline: int = 0
    # tile forward layout: 1 = (block_d, N) tiles, one channel per lane with its N states in the
    # thread (selective_scan_fwd_tile_kernel_v2), for one pass (the segmented passes keep the
    # other, measured faster there); 2 = also for the segmented passes; 0 = (N, block_d) tiles,
    # where Triton spreads a channel's states over 4 lanes (shuffles, layout conversions)
    fwd_tile_v2: int = 1
    # spacing of the states the forward saves for the backward = the backward's block of steps.
    # The forward (v2 tile) still unrolls `chunk` steps when bwd_chunk divides it; the other
    # forward kernels then use bwd_chunk for both. H100, 2026-11-27, B8 D2048 N16 L2048 bf16: the
    # lanes backward on blocks of 4 took 3.03 ms forward + backward against 4.49 on blocks of 8.
    bwd_chunk: int = 4
    # Memory bound of the states saved for the backward (bytes per call; float32, one per
    # bwd_chunk steps: B·L·D·N bytes at bwd_chunk 4, 537 MB at B8 L2048 D2048 N16, 1.07 GB per
    # layer for Mamba-1.4B at B8 L2048). Beyond it the forward saves one state per
    # `coarse_blocks` backward blocks, and the backward recomputes the others per group (one
    # more pass over the exponentials). H100, B8 D2048 N16 bf16, split-state backward (session
    # 6, call 4), forward + backward: seqlen 2048 one state per block 1.910 ms, per 4 blocks
    # 2.098, per 8 2.081, per 16 2.121, per 32 2.153; seqlen 8192 7.419, 8.170, 8.093, 8.257,
    # 8.386. So: one per block up to 1 GiB per call (the shape at 2048 fits), beyond
    # that one per 8 blocks (8x less memory for about 10% more time). Session 8, split-state
    # backward, seqlen 8192: call 4 (the current code) per 8 blocks 6.175 ms, per 4 6.425, one
    # per block 5.477; calls 2-3 (before the recompute dropped its row clamps) per 8 blocks
    # 6.27-6.32, per 2 6.883 (the forward writes more states and the backward pays more per
    # group), per 16 6.402.
    state_mem_limit: int = 2**30
    coarse_blocks: int = 8
    # forward with a channel's N states split over `fwd_quad` lanes (triton_quad.py; 2, 4, 8 or
    # 16, dividing N; 0 = off): fwd_quad times the warps of one lane per channel, no second
    # pass; it unrolls `quad_chunk` steps per iteration and loads the inputs of `quad_prefetch`
    # groups of fwd_quad steps ahead (at most quad_chunk / fwd_quad). H100, 2026-11-27, B8 D2048
    # N16 L2048 bf16 (session 5, call 3): 0.301 ms against 0.661 for the (block_d, N) tile and
    # 0.597 for mamba_ssm; Q=2 0.494, Q=8 0.482. Session 7 (calls 3, 4, 10): inference at seqlen
    # 2048 / 8192 with 16 steps and 3 groups ahead 0.270 / 1.059 ms, 8 steps and 2 ahead 0.295 /
    # 1.184, 8 and 1 0.298 / 1.169, 12 and 3 0.296 / 1.183; training forward (saving states) at
    # 2048: 0.395, 0.401, 0.453 ms
    fwd_quad: int = 4
    quad_chunk: int = 16
    quad_prefetch: int = 3
    # split-state forward: read the rows of bfloat16/float16 B and C as float32 copies made up
    # front (1), saving the unpacking of every value in every lane and step. Call 3: 0.324 ms
    # with the copies, 0.301 without (the two conversions cost more than the unpacking)
    quad_bc32: int = 0
    # split-state forward: specialise the kernel on dim and the row strides of z, B and C (1),
    # so that a step's addresses are immediate offsets (one compile per model shape); 0.396 ms
    # against 0.825 without (bfloat16 rows, no register cap)
    quad_static: int = 1
    # split-state forward: register cap per thread (0 = the compiler's choice): 16 one-warp
    # programs per SM need <= 128; 0.322 ms against 0.541 uncapped (float32 rows); 96: 0.400,
    # 80: 0.417, 64: 0.576
    quad_maxnreg: int = 128
    # backward with a channel's states split over `bwd_quad` lanes (triton_quad.py; 0 = the
    # lanes backward). H100, B8 D2048 N16 bf16, forward + backward with one saved state per
    # block (session 6, call 3): 2.031 ms against 2.676 for the lanes backward at seqlen 2048,
    # 7.888 against 10.352 at 8192; Q = 2: 2.817 and 10.94
    bwd_quad: int = 4
    # its register cap (0 = the compiler's choice): Q=4 fits 128 without spills on sm_90 (0:
    # 2.452 ms against 2.031 at seqlen 2048), Q=2 spills at 128 (benchmarks/kernel_report.py
    # bwd_quad ... --loops)
    bwd_quad_maxnreg: int = 128
    # its warps per program: the warps add their dB, dC sums before storing them, so the
    # partial sums (per block of bwd_quad_warps * 32 / bwd_quad channels) shrink that many times
    # (at B8 L2048 D2048 N16: 134 MB written and added up per call instead of 537 with one warp)
    # for about 8% more instructions per step (sm_90 SASS: 748 against 690 per block of 4);
    # H100 (session 6, calls 3, 5, 8): 2.031 ms against 2.075 with one warp at seqlen 2048,
    # 7.888 against 8.093 at 8192; 2 warps 1.913 against 1.909, 8 warps 2.094
    bwd_quad_warps: int = 4
    # its channels per lane (1, 2 or 4): a lane's dB, dC values are first added over its own
    # channels, so the butterfly, the warps' sums, the partial-sum stores and the rows of B and
    # C serve that many times the channels, for that many times the registers per lane (and
    # half the warps). H100, session 7, calls 1-2, split-state backward kernel at B8 L2048
    # (before the prefetch and XW below): 2 channels per lane 1.15-1.28 ms against 1.21 (7.75
    # warps per SM: too few to hide latency); in segments 1.01 ms plus 0.32 for the adjoint
    # pass that segments need
    bwd_quad_cpl: int = 1
    # its loads of a block's saved state and own-step rows issued one block ahead (1), and the
    # block's rows of B too (2), and (3) in memory-bounded saving (coarse_blocks) also the
    # recompute's inputs a block ahead, each group's saved state a group ahead and its first
    # handled block's inputs before the recompute. Session 7 (calls 5, 6, 12), one state per
    # block: kernel 1.203 / 1.186 ms against 1.222 without; with bwd_quad_xw 1.007 (1) and
    # 0.927 (2). Session 8 (call 4), seqlen 8192, one state per 8 blocks: training step 6.175
    # ms (3) against 6.276 (2); more loads ahead (the states from the scratch, x and dt across
    # groups) lost: they add instructions to an issue-bound loop (docs/gpu.md)
    bwd_quad_prefetch: int = 3
    # the warps' dB, dC sums through a shared-memory buffer of the kernel's own, once per block
    # of bwd_chunk steps with one barrier (1), instead of Triton's reduction over the warps at
    # every step (3 barriers and 4-way bank conflicts each; GPU and float32 only). Session 7,
    # call 12: kernel 0.927 ms against 1.184 (the per-step reduction took 0.27 of it, call 11),
    # training step 1.418 against 1.680; 8 warps 0.992 (+0.039 partial sums), 2 warps 1.017
    bwd_quad_xw: int = 1
    # saved states in a (dim, N) layout when both the forward and the backward split the states
    # and one is saved per block (a lane's 4 states adjacent: one 16-byte store / load per lane
    # instead of 4 scattered over 4 rows). H100, B8 D2048 N16 (session 6, call 13): training
    # forward 0.454 ms against 0.499 at seqlen 2048, step 1.857 against 1.907; at 8192 7.242
    # against 7.410; with one state per 8 blocks no gain (8.053 against 8.005), so not then
    state_dn: int = 1
    # (prefetching the next block's rows into L2 or L1 in the split-state backward measured
    # slower: 1.975 ms against 1.909 per training step, H100, session 6, call 5)


# The lanes forward unrolls N state vectors: beyond this, the tile kernel.
LANES_MAX_N = 64

_CONFIG = ScanConfig()
if os.environ.get("SSMKIT_SCAN_CONFIG"):  # e.g. "32,8,1,16,1,0,4" (leading fields, in order)
    _CONFIG = ScanConfig(*map(int, os.environ["SSMKIT_SCAN_CONFIG"].split(",")))


def set_config(cfg: ScanConfig) -> ScanConfig:
    """Replace the launch parameters (returns the previous ones); used by the benchmark sweeps."""
    global _CONFIG
    prev, _CONFIG = _CONFIG, cfg
    return prev


def get_config() -> ScanConfig:
    return _CONFIG


def _pow2_floor_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Geometry:
    """Shapes, block sizes and per-sequence chunk offsets shared by forward and backward."""

    def __init__(self, x, B, A, cu_seqlens, cfg: ScanConfig, block_d: int, K: int):
        self.bsz, self.L, self.dim = x.shape
        self.G = B.shape[2]
        self.N = A.shape[1]
        self.K = K  # steps per block: the spacing of the saved states
        self.block_n = max(_next_pow2(self.N), 2)
        if self.G == 1:
            self.block_d = block_d
            self.blocks_per_group = -(-self.dim // block_d)
        else:
            dpg = self.dim // self.G
            self.block_d = _pow2_floor_divisor(dpg, block_d)
            self.blocks_per_group = dpg // self.block_d
        self.n_dblocks = self.blocks_per_group * self.G
        # No masks on the channel / state loads when the blocks tile dim and N exactly.
        self.even_d = self.dim % self.block_d == 0
        self.even_n = self.block_n == self.N
        self.varlen = cu_seqlens is not None
        if self.varlen:
            c = cu_seqlens.detach().to("cpu", torch.int64)
            lens = c[1:] - c[:-1]
            nck = (lens + self.K - 1) // self.K
            self.nseq = lens.numel()
            off = torch.zeros(self.nseq, dtype=torch.int64)
            off[1:] = torch.cumsum(nck, 0)[:-1]
            self.chunk_off = off.to(x.device)
            self.cu = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()
            self.total_chunks = int(nck.sum())
            self.nchunks_per_seq = 0
        else:
            self.nseq = self.bsz
            self.nchunks_per_seq = -(-self.L // self.K)
            self.total_chunks = self.nseq * self.nchunks_per_seq
            self.cu = None
            self.chunk_off = None


def _load_group(cfg: ScanConfig, K: int) -> int:
    g = max(1, min(cfg.load_group, K))
    while K % g:
        g -= 1
    return g


def _bwd_lanes(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether the backward runs the lanes kernel (blocks of exactly 32 channels of one group)."""
    dpg = x.shape[2] // B.shape[2]
    return (bool(cfg.bwd_lanes) and A.shape[1] <= LANES_MAX_N
            and (B.shape[2] == 1 or dpg % 32 == 0))


def _bwd_quad(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> int:
    """Q of the split-state backward, or 0 (the lanes or tile backward): Q must divide N and the
    backward's block of steps, and a program's W * 32 / Q channels lie in one group."""
    q = cfg.bwd_quad
    N = A.shape[1]
    if q not in (1, 2, 4, 8, 16) or N % q or cfg.bwd_chunk % q:
        return 0
    if cfg.bwd_quad_warps not in (1, 2, 4, 8):
        return 0
    if cfg.bwd_quad_cpl not in (1, 2, 4):
        return 0
    if B.shape[2] > 1 and (x.shape[2] // B.shape[2]) % (cfg.bwd_quad_warps * cfg.bwd_quad_cpl
                                                        * 32 // q):
        return 0
    return q


# Whether the split-state backward's own shared buffer (ScanConfig.bwd_quad_xw) fits the
# shared memory Triton allocated for a compiled specialisation, by its constexprs
_XW_FITS: dict[tuple, bool] = {}


def _xw_fits(kernel, grid, args, kw: dict) -> bool:
    """Compile (without launching) the backward with ``XW=1`` and check that its shared memory
    holds the buffer: 2 halves of K * V * Q / 32 * W * 32 float32 values. Triton sizes that
    memory from its own needs (the kernel provokes an allocation of about the right size but
    cannot state one); where it falls short, the backward uses Triton's reduction (XW=0)."""
    key = tuple(sorted((k, v) for k, v in kw.items() if k != "XW"))
    if key not in _XW_FITS:
        xkw = dict(kw, XW=1)
        compiled = kernel.warmup(*args, grid=grid, **xkw)
        need = 2 * xkw["K"] * (xkw["V"] * xkw["Q"] // 32) * xkw["W"] * 32 * 4
        _XW_FITS[key] = compiled.metadata.shared >= need
    return _XW_FITS[key]


def _coarse_blocks(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                   nseq: int) -> int:
    """Backward blocks per saved state: 1, or ``cfg.coarse_blocks`` when one state per block
    would take more than ``cfg.state_mem_limit`` bytes (the lanes and split-state backwards
    recompute the states between saved ones)."""
    rows = x.shape[0] * x.shape[1]
    nbytes = (rows // cfg.bwd_chunk + nseq) * A.shape[0] * A.shape[1] * 4
    if (cfg.coarse_blocks <= 1 or nbytes <= cfg.state_mem_limit
            or not (_bwd_lanes(cfg, x, B, A) or _bwd_quad(cfg, x, B, A))):
        return 1
    return cfg.coarse_blocks


def _quad(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
          spacing: int, save_states: bool = True) -> tuple[int, int]:
    """``(Q, K)`` of the split-state forward (:mod:`triton_quad`), or ``(0, 0)`` when it does not
    apply: Q must divide N, a program's 32 / Q channels must lie in one group, and its block of
    K steps (a multiple of Q) must divide or be divided by the saved-state spacing. On a GPU, the
    tile forward runs where it measured as fast or faster (H100, 2026-11-27): where one lane per
    channel already fills the GPU (``QUAD_BELOW_WARPS_PER_SM``), and for inference too sparse for
    one pass shorter than ``QUAD_MIN_SPLIT_INFERENCE`` steps (batch-1 prefill at 2048: the tile
    forward in segments 0.300 ms on the layer's views, the split-state one 0.398 in segments;
    at 8192 0.830 against 0.756)."""
    q = cfg.fwd_quad
    N = A.shape[1]
    if q not in (1, 2, 4, 8, 16) or N % q:
        return 0, 0
    sms = _sm_count(x.device)
    lane_warps = x.shape[0] * -(-x.shape[2] // 32)  # warps of one lane per channel
    if sms and lane_warps >= QUAD_BELOW_WARPS_PER_SM * sms:
        # enough channels to fill the GPU one lane per channel: splitting the states only adds
        # instructions (H100, Mamba-1.4B prefill at batch 64 x 2048: 0.958 s against 0.91)
        return 0, 0
    if (sms and not save_states and lane_warps < 2 * sms
            and x.shape[1] < QUAD_MIN_SPLIT_INFERENCE):
        return 0, 0
    dpg = x.shape[2] // B.shape[2]
    if B.shape[2] > 1 and dpg % (32 // q):
        return 0, 0
    k = max(cfg.quad_chunk, q)
    if k % q or (k % spacing and spacing % k):
        return 0, 0
    return q, k


def _quad_rows(B: torch.Tensor, C: torch.Tensor, N: int, S: int) -> tuple[int, int]:
    """``(PACK, VEC)`` for the rows of B and C in the split-state forward: 32-bit words of two
    16-bit values (2) or of one float32 (32), else one value at a time (1); and how many words a
    lane loads at once (4, 2 or 1: the lane's S values, its row and group offsets and the rows'
    stride must all be aligned to that many words)."""
    esz = B.element_size()
    if B.dtype != C.dtype or esz not in (2, 4):
        return 1, 1
    if esz == 2:
        if S % 2 or _pack(B, C, N) != 2:
            return 1, 1
        pack, nw = 2, S // 2
    else:
        if B.dtype != torch.float32:
            return 1, 1
        pack, nw = 32, S
    for vec in (4, 2, 1):
        nb = 4 * vec
        if nw % vec == 0 and (S * esz) % nb == 0 and (N * esz) % nb == 0 and all(
                t.data_ptr() % nb == 0 and (row_stride(t) * esz) % nb == 0 for t in (B, C)):
            return pack, vec
    return 1, 1


def _pack(B: torch.Tensor, C: torch.Tensor, N: int) -> int:
    """Rows of B and C are read two 16-bit values per 32-bit load when N is even and both are
    4-byte aligned; otherwise one by one."""
    half = B.dtype in (torch.bfloat16, torch.float16)
    aligned = all(t.data_ptr() % 4 == 0 and row_stride(t) % 2 == 0 for t in (B, C))
    return 2 if (half and N % 2 == 0 and aligned) else 1


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_SMS: dict[int, int] = {}
# Shortest segment worth a pass of its own in the sequence-parallel forward / backward, and the
# warps per SM the split aims at.
MIN_SEGMENT = 128
# ... and for the split-state forward without a backward (H100, B1 D4096 N16 bf16, session 5,
# call 3: at seqlen 8192 one pass 0.905 ms, 5 segments 0.574, 8 segments 0.515)
MIN_SEGMENT_QUAD_INFERENCE = 1024
# The split-state forward runs when one lane per channel would give fewer warps per SM than this
QUAD_BELOW_WARPS_PER_SM = 16
# ... and, without a backward and below 2 such warps per SM, from this sequence length on
QUAD_MIN_SPLIT_INFERENCE = 8192
SPLIT_WARPS_PER_SM = 16
# the backward splits below this many warps per SM (the forward below 2)
BWD_SPLIT_BELOW = 8


def _segments(geo: _Geometry, cfg: ScanConfig, x: torch.Tensor,
              warps_per_block: int | None = None, below_warps_per_sm: int = 2,
              min_segment: int = MIN_SEGMENT) -> int:
    """How many segments of the sequence the forward (or backward) scans in parallel (1 = one
    pass). ``warps_per_block``: warps of one program (default: the forward's ``num_warps``);
    automatic splitting happens below ``below_warps_per_sm`` warps per SM.

    A program walks its whole segment step by step, so the forward's time is the segment length
    times the latency of one step. With fewer warps than the GPU has schedulers (batch-1 prefill:
    4,096 channels = 128 warps on 528 schedulers of an H100) most of the chip idles; splitting the
    sequence into S segments costs a second pass over the exponentials but divides the chain by S.
    ``cfg.seq_split``: 0 = decide so (CUDA only), 1 = never, S > 1 = S segments."""
    if geo.varlen or cfg.seq_split == 1:
        return 1
    if cfg.seq_split > 1:
        n = cfg.seq_split
    else:
        sms = _sm_count(x.device)
        warps = geo.nseq * geo.n_dblocks * (warps_per_block or cfg.num_warps)
        if sms == 0 or warps >= below_warps_per_sm * sms:
            return 1
        # Enough segments for about 4 warps per scheduler: with one, every step's latency is
        # exposed (H100, B1 D4096 L2048: 5 segments 0.37-0.48 ms).
        n = min(-(-SPLIT_WARPS_PER_SM * sms // warps), geo.L // min_segment)
    return max(1, min(n, -(-geo.L // geo.K)))


def _segment_length(L: int, nseg: int, K: int) -> tuple[int, int]:
    """Segment length (a multiple of K, so saved-state blocks never straddle two segments) and the
    resulting number of non-empty segments."""
    per_seg = -(-L // nseg)
    seg_len = -(-per_seg // K) * K
    return seg_len, -(-L // seg_len)


def _adjoint_segment_ends(tk, geo, At, C, z, dt, dt_bias, dy, dht, softplus, acc, seg_len, nseg,
                          B, K):
    """Passes 1-2 of the sequence-parallel backward: the adjoint entering every segment from its
    end, ``(nseq * nseg, N, dim)``: the last segment gets ``dht`` (or zero), segment s-1 gets
    ``exp(A ΣΔ_s) end_s + local_s`` with ``local_s`` the segment's adjoint run from zero."""
    shape = (geo.nseq, nseg, geo.N, geo.dim)
    dhloc = torch.empty(shape, device=dt.device, dtype=acc)
    dsum = torch.empty(geo.nseq, nseg, geo.dim, device=dt.device, dtype=acc)
    tk.adjoint_local_kernel[(geo.nseq, geo.n_dblocks, nseg)](
        dt, At, C, z, dt_bias, dy, dhloc, dsum, geo.L, geo.dim, geo.N, geo.G,
        geo.blocks_per_group, seg_len, nseg, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(softplus), USE_F64=acc == torch.float64, BLOCK_D=geo.block_d, N=geo.N,
        K=K, EVEN_D=geo.even_d, PACK=_pack(B, C, geo.N), IS_BF16=C.dtype == torch.bfloat16,
        num_warps=1)
    # The forward's chain run over the segments in reverse order.
    rev = torch.empty(shape, device=dt.device, dtype=acc)
    nd = geo.N * geo.dim
    tk.chain_segments_kernel[(geo.nseq, -(-nd // 1024))](
        dhloc.flip(1).contiguous(), dsum.flip(1).contiguous(), At, dht, rev, geo.dim, geo.N, nseg,
        HAS_H0=dht is not None, USE_F64=acc == torch.float64, BLOCK=1024, num_warps=4)
    return rev.flip(1).contiguous().view(geo.nseq * nseg, geo.N, geo.dim)


def _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens,
             want_final, save_states, cfg):
    from ssmkit.ops.selective_scan import triton_kernels as tk

    # Saved states every `ks` steps (the backward's blocks), or every ks·m when memory-bounded;
    # the v2 tile forward unrolls `chunk` steps per iteration, the other forward kernels ks.
    ks = cfg.bwd_chunk if save_states else cfg.chunk
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    m = _coarse_blocks(cfg, x, B, A, nseq) if save_states else 1
    spacing = ks * m
    quad, k_quad = _quad(cfg, x, B, A, spacing, save_states)
    geo = _Geometry(x, B, A, cu_seqlens, cfg, 32 // quad if quad else cfg.block_d, spacing)
    # With a backward to come, the forward splits like the backward (see there): the combination
    # measured fastest for training. Without one, only when the GPU would mostly idle.
    # (the split-state forward is fastest with 16 programs per SM: it splits below 8 either way)
    nseg = _segments(geo, cfg, x, warps_per_block=1 if quad else None,
                     below_warps_per_sm=BWD_SPLIT_BELOW if save_states or quad else 2,
                     min_segment=(MIN_SEGMENT_QUAD_INFERENCE if quad and not save_states
                                  else MIN_SEGMENT))
    # The (block_d, N) tile for one pass, the (N, block_d) tile for the segmented passes. H100,
    # 2026-11-27: one pass at B8 D2048 L2048 0.661 ms against 0.715; segmented at B1 D4096 L2048
    # 0.387 ms against 0.193 (0.395 / 0.348 on the layer's views), L8192 1.064 against 0.829.
    # (memory-bounded saving needs the v2 tile: it saves one state per several blocks)
    v2 = (bool(cfg.fwd_tile_v2) and (nseg == 1 or cfg.fwd_tile_v2 > 1)) or m > 1
    k_unroll = (cfg.chunk if v2 and (cfg.chunk % spacing == 0 or spacing % cfg.chunk == 0)
                else ks)
    lanes = (bool(cfg.fwd_lanes) and A.shape[1] <= LANES_MAX_N and nseg == 1 and m == 1
             and not quad)
    acc = compute_dtype(x)
    y = torch.empty_like(x)
    dn = False  # saved states (dim, N) rather than (N, dim): split-state forward and backward
    # Kernel-side layout of A and of every state: (..., N, dim), channels contiguous (the
    # split-state forward reads A in its own (dim, N) layout: no transposed copy).
    At = None if quad and nseg == 1 else A.t().contiguous()
    Ak = A if quad else At
    ht = torch.empty(geo.nseq, geo.N, geo.dim, device=x.device, dtype=acc) if want_final else None
    states = (torch.empty(max(geo.total_chunks, 1), geo.N, geo.dim, device=x.device, dtype=acc)
              if save_states else None)
    h0 = initial_state.transpose(1, 2).contiguous() if initial_state is not None else None
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                 SOFTPLUS=bool(dt_softplus), IS_VARLEN=geo.varlen,
                 USE_F64=acc == torch.float64, BLOCK_D=geo.block_d, K=geo.K,
                 G=_load_group(cfg, geo.K), EVEN_D=geo.even_d)
    dims = (geo.L, geo.dim, geo.N, geo.G, geo.blocks_per_group, geo.nchunks_per_seq,
            row_stride(z), row_stride(B), row_stride(C))
    if lanes:
        tk.selective_scan_fwd_kernel[(geo.nseq, geo.n_dblocks)](
            x, dt, At, B, C, D, z, dt_bias, h0, y, ht, states, geo.cu, geo.chunk_off, *dims,
            **flags, HAS_H0=h0 is not None, STORE_HT=want_final, SAVE_STATES=save_states,
            N=geo.N, PACK=_pack(B, C, geo.N), IS_BF16=B.dtype == torch.bfloat16,
            num_warps=cfg.num_warps)
    else:
        tflags = dict(flags, BLOCK_N=geo.block_n, EVEN_N=geo.even_n, num_warps=cfg.num_warps,
                      PIPELINE=bool(cfg.fwd_pipeline))
        if quad:
            from ssmkit.ops.selective_scan import triton_quad

            tile = triton_quad.selective_scan_fwd_quad_kernel
            S = geo.N // quad
            if cfg.quad_bc32 and B.element_size() == 2:
                B, C = B.float(), C.float()  # (one copy of each: 4·rows·G·N bytes)
            pack, vec = _quad_rows(B, C, geo.N, S)
            dims = dims[:7] + (row_stride(B), row_stride(C))
            tflags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                          SOFTPLUS=bool(dt_softplus), IS_VARLEN=geo.varlen,
                          USE_F64=acc == torch.float64, Q=quad, S=S, K=k_quad, KS=geo.K,
                          # (a prefetch must stay within the next block: PF * Q <= K)
                          PF=max(1, min(cfg.quad_prefetch, k_quad // quad)),
                          EVEN_D=geo.even_d, PACK=pack,
                          VEC=vec, IS_BF16=B.dtype == torch.bfloat16, num_warps=1)
            if cfg.quad_static:
                tflags.update(DIM_C=geo.dim, ZRS_C=max(dims[6], 0), BRS_C=dims[7],
                              CRS_C=dims[8])
            # (the split-state backward reads the states in the layout saved here)
            dn = bool(save_states and cfg.state_dn and m == 1 and _bwd_quad(cfg, x, B, A))
            tflags["STATE_DN"] = dn
            tflags["A_DN"] = geo.N
            if cfg.quad_maxnreg and x.device.type == "cuda":
                tflags["maxnreg"] = cfg.quad_maxnreg
        elif v2:
            tile = tk.selective_scan_fwd_tile_kernel_v2
            tflags.update(K=k_unroll, G=_load_group(cfg, k_unroll), KS=geo.K)
            # bfloat16 rows of B, C as 32-bit words of two values (needs N == BLOCK_N)
            bf16 = B.dtype == torch.bfloat16 and C.dtype == torch.bfloat16
            tflags["PACK"] = _pack(B, C, geo.N) if bf16 and geo.even_n else 1
        else:
            tile = tk.selective_scan_fwd_tile_kernel
        if nseg == 1:
            # one segment: the whole sequence (any length, packed sequences too)
            seg_len = max(geo.L, 1) if not geo.varlen else 2**62
            tile[(geo.nseq, geo.n_dblocks, 1)](
                x, dt, Ak, B, C, D, z, dt_bias, h0, y, ht, states, geo.cu, geo.chunk_off, None,
                *dims, seg_len, 1, **tflags, HAS_H0=h0 is not None, STORE_HT=want_final,
                SAVE_STATES=save_states, STORE_Y=True, STORE_DSUM=False)
        else:
            seg_len, nseg = _segment_length(geo.L, nseg, max(tflags["K"], geo.K))
            grid = (geo.nseq, geo.n_dblocks, nseg)
            # pass 1: each segment from a zero state -> its end state and ΣΔ
            hloc = torch.empty(geo.nseq * nseg, geo.N, geo.dim, device=x.device, dtype=acc)
            dsum = torch.empty(geo.nseq * nseg, geo.dim, device=x.device, dtype=acc)
            tile[grid](x, dt, Ak, B, C, D, z, dt_bias, None, y, hloc, None, geo.cu,
                       geo.chunk_off, dsum, *dims, seg_len, nseg, **tflags, HAS_H0=False,
                       STORE_HT=True, SAVE_STATES=False, STORE_Y=False, STORE_DSUM=True)
            # pass 2: chain the segments, start_s = exp(A ΣΔ_{s-1}) start_{s-1} + hloc_{s-1}
            starts = torch.empty_like(hloc)
            nd = geo.N * geo.dim
            tk.chain_segments_kernel[(geo.nseq, -(-nd // 1024))](
                hloc, dsum, At, h0, starts, geo.dim, geo.N, nseg, HAS_H0=h0 is not None,
                USE_F64=acc == torch.float64, BLOCK=1024, num_warps=4)
            # pass 3: every segment from its start state -> y (and the saved/final states)
            hts = (torch.empty(geo.nseq * nseg, geo.N, geo.dim, device=x.device, dtype=acc)
                   if want_final else None)
            tile[grid](x, dt, Ak, B, C, D, z, dt_bias, starts, y, hts, states, geo.cu,
                       geo.chunk_off, None, *dims, seg_len, nseg, **tflags, HAS_H0=True,
                       STORE_HT=want_final, SAVE_STATES=save_states, STORE_Y=True,
                       STORE_DSUM=False)
            if want_final:
                ht = hts.view(geo.nseq, nseg, geo.N, geo.dim)[:, -1]
    if ht is not None:
        ht = ht.transpose(1, 2).contiguous()  # (nseq, dim, N), the public layout
    return y, ht, states, m, dn


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus,
                return_final_state):
        cfg = _CONFIG
        y, ht, states, m, dn = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                        initial_state, cu_seqlens, return_final_state, True, cfg)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states)
        ctx.dt_softplus = dt_softplus
        ctx.cfg = cfg
        ctx.coarse = m  # backward blocks per saved state
        ctx.state_dn = dn  # their layout: (dim, N) or (N, dim)
        if return_final_state:
            return y, ht
        return y

    @staticmethod
    def backward(ctx, dy, dht=None):
        from ssmkit.ops.selective_scan import triton_kernels as tk

        x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states = ctx.saved_tensors
        # the backward kernels read z, B and C contiguous (the forward took views)
        B, C = B.contiguous(), C.contiguous()
        z = z.contiguous() if z is not None else None
        cfg = ctx.cfg
        m = ctx.coarse  # > 1 only with the lanes or split-state backward
        quad = _bwd_quad(cfg, x, B, A)
        lanes = _bwd_lanes(cfg, x, B, A) or bool(quad)
        block_d = (cfg.bwd_quad_warps * cfg.bwd_quad_cpl * 32 // quad if quad
                   else (32 if lanes else cfg.bwd_block_d))
        geo = _Geometry(x, B, A, cu_seqlens, cfg, block_d, cfg.bwd_chunk * m)
        acc = compute_dtype(x)
        dy = dy.contiguous()
        if dht is not None:
            dht = dht.transpose(1, 2).contiguous()
        rows = geo.bsz * geo.L
        # The backward (and the forward before it) splits below 8 warps per SM: H100, 2026-11-27,
        # B8 D2048 N16 L2048 (512 warps on 132 SMs), forward + backward 3.03 ms with 4 segments
        # against 3.53 in one pass (the forward alone is faster in one pass there: 0.661 against
        # 0.751 ms).
        # (a split-state program's warps count once per channel of a lane: the same work)
        nseg = (_segments(geo, cfg, x,
                          warps_per_block=cfg.bwd_quad_warps * cfg.bwd_quad_cpl if quad else 1,
                          below_warps_per_sm=BWD_SPLIT_BELOW)
                if lanes else 1)
        seg_len = max(geo.L, 1) if not geo.varlen else 2**62
        # A as (N, dim) for the kernels but the split-state backward, which reads it as it is
        At = A.t().contiguous() if nseg > 1 or not quad else None
        if nseg > 1:
            seg_len, nseg = _segment_length(geo.L, nseg, geo.K)
            dht = _adjoint_segment_ends(tk, geo, At, C, z, dt, dt_bias, dy, dht, ctx.dt_softplus,
                                        acc, seg_len, nseg, B, cfg.bwd_chunk)
        nout = geo.nseq * nseg
        dbias_part = None
        dx = torch.empty_like(x)
        ddt = torch.empty_like(dt)
        dz = torch.empty_like(z) if z is not None else None
        db_part = torch.empty(geo.n_dblocks, rows, geo.N, device=x.device, dtype=acc)
        dc_part = torch.empty_like(db_part)
        da_part = torch.empty(nout, geo.N, geo.dim, device=x.device, dtype=acc)
        dd_part = torch.empty(nout, geo.dim, device=x.device, dtype=acc) if D is not None else None
        dh0 = torch.empty(nout, geo.N, geo.dim, device=x.device, dtype=acc)
        args = (x, dt, A if quad else At, B, C, D, z, dt_bias, states, geo.cu, geo.chunk_off, dy,
                dht, dx, ddt, dz, db_part, dc_part, da_part, dd_part, dh0,
                geo.L, geo.dim, geo.N, geo.G, geo.blocks_per_group, geo.nchunks_per_seq, rows)
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                     SOFTPLUS=bool(ctx.dt_softplus), HAS_DHT=dht is not None,
                     IS_VARLEN=geo.varlen, USE_F64=acc == torch.float64, BLOCK_D=geo.block_d,
                     K=cfg.bwd_chunk)
        if quad:
            from ssmkit.ops.selective_scan import triton_quad

            S = geo.N // quad
            bd = 32 // quad  # channels per warp
            qflags = {k: v for k, v in flags.items() if k != "BLOCK_D"}
            pack, vec = _quad_rows(B, C, geo.N, S)
            if cfg.quad_static:
                qflags["DIM_C"] = geo.dim
                qflags["BCS_C"] = geo.G * geo.N
            if cfg.bwd_quad_maxnreg and x.device.type == "cuda":
                qflags["maxnreg"] = cfg.bwd_quad_maxnreg
            grid = (geo.nseq, geo.n_dblocks, nseg)
            # per program and lane: the S states entering each of a group's M blocks
            cpl = cfg.bwd_quad_cpl
            scratch = (torch.empty(grid[0] * grid[1] * grid[2] * m * cpl * S
                                   * cfg.bwd_quad_warps * 32, device=x.device, dtype=acc)
                       if m > 1 else states)
            # dt_bias's gradient summed in the kernel, per (sequence, segment) and channel
            if dt_bias is not None and ctx.needs_input_grad[7]:
                dbias_part = torch.empty(nout, geo.dim, device=x.device, dtype=acc)
            kernel = triton_quad.selective_scan_bwd_quad_kernel
            kw = dict(qflags, Q=quad, S=S, EVEN_D=geo.even_d, PACK=pack, VEC=vec,
                      IS_BF16=B.dtype == torch.bfloat16, V=-(-2 * S // bd) * bd,
                      W=cfg.bwd_quad_warps, M=m, STATE_DN=ctx.state_dn, CPL=cpl,
                      DBIAS=dbias_part is not None, A_DN=geo.N, PFB=cfg.bwd_quad_prefetch,
                      XW=0, num_warps=cfg.bwd_quad_warps)
            qargs = (*args, seg_len, nseg, scratch, dbias_part)
            if (cfg.bwd_quad_xw and x.device.type == "cuda" and acc == torch.float32
                    and cfg.bwd_quad_warps > 1):
                kw["XW"] = int(_xw_fits(kernel, grid, qargs, kw))
            kernel[grid](*qargs, **kw)
        elif lanes:
            grid = (geo.nseq, geo.n_dblocks, nseg)
            # per program: the M block-start states of the group being recomputed
            scratch = (torch.empty(grid[0] * grid[1] * grid[2] * m * geo.N * 32, device=x.device,
                                   dtype=acc) if m > 1 else states)
            tk.selective_scan_bwd_lanes_kernel[grid](
                *args, seg_len, nseg, scratch, **flags, N=geo.N, EVEN_D=geo.even_d,
                PACK=_pack(B, C, geo.N), IS_BF16=B.dtype == torch.bfloat16,
                V=-(-2 * geo.N // 32) * 32, M=m, num_warps=1)
        else:
            tk.selective_scan_bwd_kernel[(geo.nseq, geo.n_dblocks)](
                *args, **flags, BLOCK_N=geo.block_n, KEEP_DECAY=bool(cfg.keep_decay),
                num_warps=cfg.bwd_num_warps)
        if nseg > 1:
            dh0 = dh0.view(geo.nseq, nseg, geo.N, geo.dim)[:, 0]
        G, bpg, N = geo.G, geo.blocks_per_group, geo.N

        def _group_sum(part, dtype):  # (G*bpg, rows, N) -> (bsz, L, G, N), one pass
            out = torch.empty(geo.bsz, geo.L, G, N, device=part.device, dtype=dtype)
            if rows:
                tk.sum_partials_kernel[(-(-rows * N // 1024), G)](
                    part, out, bpg, rows * N, N, G, USE_F64=acc == torch.float64, BLOCK=1024,
                    num_warps=4)
            return out

        dB = _group_sum(db_part, B.dtype) if ctx.needs_input_grad[3] else None
        dC = _group_sum(dc_part, C.dtype) if ctx.needs_input_grad[4] else None
        dA = da_part.sum(0).t().to(A.dtype) if ctx.needs_input_grad[2] else None
        dD = dd_part.sum(0).to(D.dtype) if (D is not None and ctx.needs_input_grad[5]) else None
        dbias = None
        if dbias_part is not None:
            dbias = dbias_part.sum(0).to(dt_bias.dtype)
        elif dt_bias is not None and ctx.needs_input_grad[7]:
            # (summed in float32 without a float32 copy of ddt: 0.05 ms at B8 L2048 D2048)
            dbias = ddt.sum((0, 1), dtype=acc).to(dt_bias.dtype)
        dinit = dh0.transpose(1, 2).to(initial_state.dtype) if initial_state is not None else None
        return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit, None, None, None


def row_stride(t: torch.Tensor | None) -> int:
    """Distance between consecutive rows (batch * seqlen positions) of ``t``
    ``(batch, seqlen, *inner)`` whose inner block is contiguous and whose rows are evenly spaced
    (a slice of a projection's output, say); -1 when it has no such layout."""
    if t is None:
        return 0
    bsz, L = t.shape[:2]
    inner = t.shape[2:]
    expect = 1
    for size, stride in zip(reversed(inner), reversed(t.stride()[2:])):
        if size != 1 and stride != expect:
            return -1
        expect *= size
    if L == 1:
        return t.stride(0)
    if bsz == 1 or t.stride(0) == L * t.stride(1):
        return t.stride(1)
    return -1


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when the forward kernels can read it through :func:`row_stride`, else a
    contiguous copy."""
    if t is None or row_stride(t) > 0:
        return t
    return t.contiguous()


def _prepare(x, dt, A, B, C, D, z, dt_bias, initial_state):
    squeeze = B.dim() == 3
    if squeeze:
        B = B.unsqueeze(2)
        C = C.unsqueeze(2)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    cont = [t.contiguous() if t is not None else None for t in (x, dt, A, D, dt_bias)]
    x, dt, A, D, dt_bias = cont
    # z, B and C are read through their row strides (no copy of a projection's slices)
    return x, dt, A, _rows(B), _rows(C), D, _rows(z), dt_bias, initial_state, squeeze


@register("selective_scan", "triton")
def selective_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                          initial_state=None, return_final_state=False, cu_seqlens=None):
    """Triton selective scan; see the module docstring for shapes. Inputs are assumed validated by
    the public :func:`ssmkit.ops.selective_scan`."""
    x, dt, A, B, C, D, z, dt_bias, initial_state, _ = _prepare(x, dt, A, B, C, D, z, dt_bias,
                                                              initial_state)
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad:
        out = _SelectiveScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens,
                                     bool(dt_softplus), bool(return_final_state))
        return out
    y, ht, _, _, _ = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state,
                              cu_seqlens, bool(return_final_state), False, _CONFIG)
    return (y, ht) if return_final_state else y


# The Triton form of causal conv1d lives in its own module, which imports no Triton at module
# level either; importing it here registers it with dispatch.
from ssmkit.ops.conv import causal_conv1d_triton  # noqa: E402,F401
