"""``backend="triton"`` form of :func:`ssmkit.ops.selective_scan` (an ``autograd.Function``).

Same signature and results as the ``reference`` form::

    selective_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                          initial_state=None, return_final_state=False, cu_seqlens=None)

* ``x, dt, z``: ``(batch, seqlen, dim)``; ``A``: ``(dim, N)``; ``B, C``: ``(batch, seqlen, N)`` or
  ``(batch, seqlen, G, N)``; ``D, dt_bias``: ``(dim,)``; ``initial_state``: ``(batch, dim, N)``
  (``(num_seqs, dim, N)`` with ``cu_seqlens``). Returns ``y`` ``(batch, seqlen, dim)`` in ``x``'s
  dtype and, with ``return_final_state``, the float32 final state ``(batch | num_seqs, dim, N)``.

Two kernel families fuse softplus(dt + dt_bias), the discretization, the scan with the state on
chip, C·h, D·x and the z gate; the backward recomputes states from block boundaries saved every
``K`` tokens instead of storing the expanded state:

* ``triton_split_state.py`` / ``triton_split_state_bwd.py`` (the defaults): a channel's N states
  split over Q lanes, forward and backward; memory-bounded saving (one state per several blocks, the backward recomputing the
  rest per group).
* ``triton_tile.py``: one lane per channel, ``(block_d, N)`` tiles. The tile forward runs where
  one lane per channel already fills the GPU; the tile backward is the general fallback (any N,
  any grouping). Also the segment chaining, the segments' adjoint pass and the dB/dC sums.

:class:`ScanConfig` holds the few launch parameters a user may want to change. Float16/bfloat16/float32 inputs are
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
    """Launch parameters of the selective-scan kernels (docs/gpu.md says why each default).

    The defaults pick the split-state kernels (a channel's N states over Q lanes,
    :mod:`triton_split_state`) wherever they apply and the tile kernels (one lane per channel,
    :mod:`triton_tile`) elsewhere: the tile forward where one lane per channel already fills the
    GPU, the tile backward as the general fallback."""

    # split-state forward: lanes per channel Q (a power of two; the largest Q <= this that divides
    # N and keeps a program's 32 / Q channels in one group; 0 = always the tile forward). More
    # lanes = more warps in flight for the same work, fewer states per lane.
    fwd_quad: int = 4
    # split-state forward: steps unrolled per loop iteration (a multiple of Q): longer bodies hide
    # more load latency, at the price of registers and compile time
    quad_chunk: int = 16
    # split-state backward: lanes per channel (as fwd_quad; 0 = always the tile backward)
    bwd_quad: int = 4
    # split-state backward: warps per program (1, 2, 4, 8); their dB, dC sums are added before
    # they are stored, so more warps = fewer partial sums written, more instructions per step
    bwd_quad_warps: int = 4
    # steps per backward block = spacing of the states the forward saves: shorter blocks keep
    # fewer states in registers during the recompute, and save more states
    bwd_chunk: int = 4
    # tile forward: channels per program and steps unrolled per loop iteration
    block_d: int = 32
    chunk: int = 8
    # sequence segments scanned in parallel and chained: 0 = when the GPU would otherwise idle,
    # 1 = never, S > 1 = S segments (_segments)
    seq_split: int = 0
    # bytes of saved states one call may keep for its backward (float32, one per bwd_chunk steps:
    # B*L*D*N bytes at bwd_chunk 4); beyond it, one state per `coarse_blocks` blocks, and the
    # backward recomputes the others (more compute, coarse_blocks times less memory)
    state_mem_limit: int = 2**30
    coarse_blocks: int = 8


# Fixed launch choices (measured, docs/gpu.md): the tile forward loads its inputs in groups of
# TILE_LOAD_GROUP steps; the split-state forward loads QUAD_PREFETCH groups of Q steps ahead;
# both split-state kernels are capped at MAX_REGISTERS per thread (16 one-warp programs per SM);
# the tile backward (the fallback) takes TILE_BWD_BLOCK_D channels per program.
TILE_LOAD_GROUP = 4
QUAD_PREFETCH = 3
MAX_REGISTERS = 128
TILE_BWD_BLOCK_D = 16
# The split-state kernels keep S = N / Q states per lane (per step of a block in the backward):
# beyond this, the tile kernels.
MAX_STATES_PER_LANE = 64


def parse_config(text: str, base: ScanConfig | None = None) -> ScanConfig:
    """``"name=value,name=value"`` (integers) applied to ``base`` (default: the defaults); the
    format of the ``SSMKIT_SCAN_CONFIG`` environment variable."""
    base = base if base is not None else ScanConfig()
    fields = {f.name for f in dataclasses.fields(ScanConfig)}
    over = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"SSMKIT_SCAN_CONFIG: expected name=value with a name in {sorted(fields)}, "
                             f"got {item!r}")
        try:
            over[name] = int(value)
        except ValueError:
            raise ValueError(f"SSMKIT_SCAN_CONFIG: {name} must be an integer, got {value!r}") from None
    return dataclasses.replace(base, **over)


_CONFIG = parse_config(os.environ.get("SSMKIT_SCAN_CONFIG", ""))


def set_config(cfg: ScanConfig) -> ScanConfig:
    """Replace the launch parameters (returns the previous ones); used by the benchmarks."""
    global _CONFIG
    if not isinstance(cfg, ScanConfig):
        raise TypeError(f"cfg must be a ScanConfig, got {type(cfg).__name__}")
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


def _lanes_per_channel(q_max: int, N: int, dim: int, G: int, chans_per_lane_q) -> int:
    """The largest power of two Q <= ``q_max`` for the split-state kernels: Q divides N, the
    N / Q states of a lane fit (``MAX_STATES_PER_LANE``) and, with groups, a program's
    ``chans_per_lane_q(Q)`` channels lie in one group; 0 when none does (the tile kernels)."""
    q = 1 << (max(q_max, 0).bit_length() - 1) if q_max > 0 else 0
    while q >= 1:
        if (N % q == 0 and N // q <= MAX_STATES_PER_LANE
                and (G == 1 or (dim // G) % chans_per_lane_q(q) == 0)):
            return q
        q //= 2
    return 0


def _bwd_split(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> tuple[int, int]:
    """``(Q, W)`` of the split-state backward, or ``(0, 0)`` (the tile backward): Q as in
    :func:`_lanes_per_channel` and dividing the block of ``bwd_chunk`` steps; W warps per program
    (at most ``bwd_quad_warps``), fewer where a group has too few channels for W * 32 / Q."""
    N, dim, G = A.shape[1], x.shape[2], B.shape[2]
    for w in (8, 4, 2, 1):
        if w > cfg.bwd_quad_warps:
            continue
        q = _lanes_per_channel(min(cfg.bwd_quad, cfg.bwd_chunk), N, dim, G,
                               lambda q, w=w: w * 32 // q)
        if q and cfg.bwd_chunk % q == 0:
            return q, w
    return 0, 0


# Whether the split-state backward's own shared buffer (XW) fits the
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


def _coarse_blocks(cfg: ScanConfig, x: torch.Tensor, A: torch.Tensor, nseq: int) -> int:
    """Backward blocks per saved state: 1, or ``cfg.coarse_blocks`` when one state per block
    would take more than ``cfg.state_mem_limit`` bytes (the backward then recomputes the states
    between saved ones)."""
    rows = x.shape[0] * x.shape[1]
    nbytes = (rows // cfg.bwd_chunk + nseq) * A.shape[0] * A.shape[1] * 4
    if cfg.coarse_blocks <= 1 or nbytes <= cfg.state_mem_limit:
        return 1
    return cfg.coarse_blocks


def _fwd_split(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
               spacing: int) -> tuple[int, int]:
    """``(Q, K)`` of the split-state forward (:mod:`triton_split_state`), or ``(0, 0)`` for the
    tile forward: Q as in :func:`_lanes_per_channel` (a program's 32 / Q channels in one group),
    its block of K steps (a multiple of Q) a divisor or a multiple of the saved-state spacing.
    On a GPU where one lane per channel already fills it (``QUAD_BELOW_WARPS_PER_SM``), the tile
    forward: splitting the states only adds instructions there (H100, 2026-11-27, Mamba-1.4B
    prefill at batch 64 x 2048: 0.958 s against 0.91)."""
    sms = _sm_count(x.device)
    lane_warps = x.shape[0] * -(-x.shape[2] // 32)  # warps of one lane per channel
    if sms and lane_warps >= QUAD_BELOW_WARPS_PER_SM * sms:
        return 0, 0
    q = _lanes_per_channel(cfg.fwd_quad, A.shape[1], x.shape[2], B.shape[2], lambda q: 32 // q)
    if not q:
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
# ... and the split-state forward without a backward, which splits into QUAD_INFERENCE_SEGMENTS
# segments of at least MIN_SEGMENT_QUAD_INFERENCE steps (H100, B1 D4096 N16 bf16, 2026-11-27:
# at seqlen 8192 one pass 0.905 ms, 5 segments 0.574, 8 segments 0.482-0.515)
MIN_SEGMENT_QUAD_INFERENCE = 256
QUAD_INFERENCE_SEGMENTS = 8
# The split-state forward runs when one lane per channel would give fewer warps per SM than this
QUAD_BELOW_WARPS_PER_SM = 16
SPLIT_WARPS_PER_SM = 16
# the backward splits below this many warps per SM (the forward below 2)
BWD_SPLIT_BELOW = 8


def _segments(geo: _Geometry, cfg: ScanConfig, x: torch.Tensor,
              warps_per_block: int | None = None, below_warps_per_sm: int = 2,
              min_segment: int = MIN_SEGMENT) -> int:
    """How many segments of the sequence the forward (or backward) scans in parallel (1 = one
    pass). ``warps_per_block``: warps of one program (default 1);
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
        warps = geo.nseq * geo.n_dblocks * (warps_per_block or 1)
        if sms == 0 or warps >= below_warps_per_sm * sms:
            return 1
        # Enough segments for about 4 warps per scheduler: with one, every step's latency is
        # exposed (H100, B1 D4096 L2048: 5 segments 0.37-0.48 ms).
        n = min(-(-SPLIT_WARPS_PER_SM * sms // warps), geo.L // min_segment)
    return max(1, min(n, -(-geo.L // geo.K)))


def _forward_segments(geo: _Geometry, cfg: ScanConfig, x: torch.Tensor, quad: int,
                      save_states: bool) -> int:
    """Segments of the forward. With a backward to come, the forward splits like the backward
    (see there): the combination measured fastest for training. Without one, the tile forward
    only when the GPU would mostly idle; the split-state forward (fastest with 16 programs per
    SM) below 8 warps per SM, into QUAD_INFERENCE_SEGMENTS segments."""
    nseg = _segments(geo, cfg, x, warps_per_block=1,
                     below_warps_per_sm=BWD_SPLIT_BELOW if save_states or quad else 2,
                     min_segment=(MIN_SEGMENT_QUAD_INFERENCE if quad and not save_states
                                  else MIN_SEGMENT))
    if nseg > 1 and quad and not save_states and cfg.seq_split == 0:
        nseg = max(1, min(QUAD_INFERENCE_SEGMENTS, geo.L // MIN_SEGMENT_QUAD_INFERENCE))
    return nseg


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


def saved_states_rows(x: torch.Tensor, cu_seqlens: torch.Tensor | None, spacing: int) -> int:
    """Rows of the saved-states buffer, from shapes alone (so that a traced graph knows it): one
    per ``spacing`` steps of each sequence; with packed sequences an upper bound (each sequence
    may end in a partial block)."""
    blocks = -(-x.shape[1] // spacing)
    if cu_seqlens is None:
        return max(x.shape[0] * blocks, 1)
    return blocks + cu_seqlens.shape[0] - 1


def saved_states_layout(cfg: ScanConfig, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                        cu_seqlens: torch.Tensor | None) -> tuple[tuple[int, int, int], int, bool]:
    """What the training forward saves for the backward, from shapes alone: the shape of the
    states ``(rows, N, dim)``, the backward blocks per saved state ``m`` and whether they are
    laid out ``(dim, N)`` (the split-state forward and backward, one state per block). ``B``
    ``(batch, seqlen, G, N)``."""
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    m = _coarse_blocks(cfg, x, A, nseq)
    spacing = cfg.bwd_chunk * m
    dn = bool(m == 1 and _fwd_split(cfg, x, B, A, spacing)[0] and _bwd_split(cfg, x, B, A)[0])
    return (saved_states_rows(x, cu_seqlens, spacing), A.shape[1], x.shape[2]), m, dn


def _load_group(K: int) -> int:
    """Steps whose inputs the tile forward loads together: TILE_LOAD_GROUP or a divisor of K."""
    g = max(1, min(TILE_LOAD_GROUP, K))
    while K % g:
        g -= 1
    return g


def _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens,
             want_final, save_states, cfg, state_dn=False):
    """The forward kernels: ``(y, final state, saved states, m, layout)`` with ``m`` backward
    blocks per saved state and ``layout`` True where the states are saved ``(dim, N)`` (asked for
    by ``state_dn``: the split-state backward reads them so, one per block)."""
    from ssmkit.ops.selective_scan import triton_tile as tk

    # Saved states every `ks` steps (the backward's blocks), or every ks·m when memory-bounded.
    ks = cfg.bwd_chunk if save_states else cfg.chunk
    nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    m = _coarse_blocks(cfg, x, A, nseq) if save_states else 1
    spacing = ks * m
    quad, k_quad = _fwd_split(cfg, x, B, A, spacing)
    geo = _Geometry(x, B, A, cu_seqlens, cfg, 32 // quad if quad else cfg.block_d, spacing)
    nseg = _forward_segments(geo, cfg, x, quad, save_states)
    acc = compute_dtype(x)
    y = torch.empty_like(x)
    dn = bool(save_states and state_dn and quad and m == 1)
    # Kernel-side layout of A and of every state: (..., N, dim), channels contiguous (the
    # split-state forward reads A in its own (dim, N) layout: no transposed copy).
    At = None if quad and nseg == 1 else A.t().contiguous()
    Ak = A if quad else At
    ht = torch.empty(geo.nseq, geo.N, geo.dim, device=x.device, dtype=acc) if want_final else None
    states = (torch.empty(saved_states_rows(x, cu_seqlens, geo.K), geo.N, geo.dim,
                          device=x.device, dtype=acc) if save_states else None)
    h0 = initial_state.transpose(1, 2).contiguous() if initial_state is not None else None
    dims = (geo.L, geo.dim, geo.N, geo.G, geo.blocks_per_group, geo.nchunks_per_seq,
            row_stride(z), row_stride(B), row_stride(C))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                 SOFTPLUS=bool(dt_softplus), IS_VARLEN=geo.varlen,
                 USE_F64=acc == torch.float64, EVEN_D=geo.even_d, num_warps=1)
    if quad:
        from ssmkit.ops.selective_scan import triton_split_state

        kernel = triton_split_state.selective_scan_fwd_quad_kernel
        S = geo.N // quad
        pack, vec = _quad_rows(B, C, geo.N, S)
        # specialised on dim and the row strides of z, B and C: a step's addresses are
        # immediate offsets (one compile per model shape)
        flags.update(Q=quad, S=S, K=k_quad, KS=geo.K,
                     PF=max(1, min(QUAD_PREFETCH, k_quad // quad)),  # (PF * Q <= K)
                     PACK=pack, VEC=vec, IS_BF16=B.dtype == torch.bfloat16, DIM_C=geo.dim,
                     ZRS_C=max(dims[6], 0), BRS_C=dims[7], CRS_C=dims[8], STATE_DN=dn,
                     A_DN=geo.N)
        if x.device.type == "cuda":
            flags["maxnreg"] = MAX_REGISTERS
        unroll = k_quad
    else:
        kernel = tk.selective_scan_fwd_tile_kernel
        unroll = (cfg.chunk if cfg.chunk % spacing == 0 or spacing % cfg.chunk == 0 else ks)
        # bfloat16 rows of B, C as 32-bit words of two values (needs N == BLOCK_N)
        bf16 = B.dtype == torch.bfloat16 and C.dtype == torch.bfloat16
        flags.update(BLOCK_D=geo.block_d, BLOCK_N=geo.block_n, EVEN_N=geo.even_n, K=unroll,
                     G=_load_group(unroll), KS=geo.K,
                     PACK=_pack(B, C, geo.N) if bf16 and geo.even_n else 1)
    if nseg == 1:
        # one segment: the whole sequence (any length, packed sequences too)
        seg_len = max(geo.L, 1) if not geo.varlen else 2**62
        kernel[(geo.nseq, geo.n_dblocks, 1)](
            x, dt, Ak, B, C, D, z, dt_bias, h0, y, ht, states, geo.cu, geo.chunk_off, None,
            *dims, seg_len, 1, **flags, HAS_H0=h0 is not None, STORE_HT=want_final,
            SAVE_STATES=save_states, STORE_Y=True, STORE_DSUM=False)
    else:
        seg_len, nseg = _segment_length(geo.L, nseg, max(unroll, geo.K))
        grid = (geo.nseq, geo.n_dblocks, nseg)
        # pass 1: each segment from a zero state -> its end state and ΣΔ
        hloc = torch.empty(geo.nseq * nseg, geo.N, geo.dim, device=x.device, dtype=acc)
        dsum = torch.empty(geo.nseq * nseg, geo.dim, device=x.device, dtype=acc)
        kernel[grid](x, dt, Ak, B, C, D, z, dt_bias, None, y, hloc, None, geo.cu,
                     geo.chunk_off, dsum, *dims, seg_len, nseg, **flags, HAS_H0=False,
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
        kernel[grid](x, dt, Ak, B, C, D, z, dt_bias, starts, y, hts, states, geo.cu,
                     geo.chunk_off, None, *dims, seg_len, nseg, **flags, HAS_H0=True,
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
        # (the split-state backward reads the states (dim, N): a lane's states adjacent)
        y, ht, states, m, dn = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                        initial_state, cu_seqlens, return_final_state, True, cfg,
                                        state_dn=_bwd_split(cfg, x, B, A)[0] > 0)
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
        grads = backward_from_states(ctx.saved_tensors, dy, dht, ctx.dt_softplus, ctx.coarse,
                                     ctx.state_dn, ctx.needs_input_grad[:9], ctx.cfg)
        return (*grads, None, None, None)


def backward_from_states(saved, dy, dht, dt_softplus, m, dn, needs, cfg=None):
    """The backward pass from what the forward saved: ``saved`` = ``(x, dt, A, B, C, D, z,
    dt_bias, initial_state, cu_seqlens, states)`` (B, C 4-D), ``m`` backward blocks per saved
    state and ``dn`` their layout (:func:`saved_states_layout`); ``needs``: which of the 9
    inputs want a gradient. Returns the 9 gradients (None where not needed or no input)."""
    from ssmkit.ops.selective_scan import triton_tile as tk

    cfg = cfg if cfg is not None else _CONFIG
    x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, states = saved
    # the backward kernels read z, B and C contiguous (the forward took views)
    B, C = B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    quad, warps = _bwd_split(cfg, x, B, A)
    if not quad and (m > 1 or dn):
        # the tile backward reads one state per block, (N, dim): recompute them from the saved
        # ones by a forward pass that saves every block (memory-bounded: they live only now)
        states = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state,
                          cu_seqlens, False, True, dataclasses.replace(cfg, state_mem_limit=2**62))[2]
        m, dn = 1, False
    block_d = warps * 32 // quad if quad else TILE_BWD_BLOCK_D
    geo = _Geometry(x, B, A, cu_seqlens, cfg, block_d, cfg.bwd_chunk * m)
    acc = compute_dtype(x)
    dy = dy.contiguous()
    if dht is not None:
        dht = dht.transpose(1, 2).contiguous()
    rows = geo.bsz * geo.L
    # The backward (and the forward before it) splits below 8 warps per SM: H100, 2026-11-27,
    # B8 D2048 N16 L2048 (512 warps on 132 SMs), forward + backward 3.03 ms with 4 segments
    # against 3.53 in one pass. (A split-state program's warps count once: the same work.)
    nseg = (_segments(geo, cfg, x, warps_per_block=warps, below_warps_per_sm=BWD_SPLIT_BELOW)
            if quad else 1)
    seg_len = max(geo.L, 1) if not geo.varlen else 2**62
    # A as (N, dim) for the kernels but the split-state backward, which reads it as it is
    At = A.t().contiguous() if nseg > 1 or not quad else None
    if nseg > 1:
        seg_len, nseg = _segment_length(geo.L, nseg, geo.K)
        dht = _adjoint_segment_ends(tk, geo, At, C, z, dt, dt_bias, dy, dht, dt_softplus,
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
                 SOFTPLUS=bool(dt_softplus), HAS_DHT=dht is not None,
                 IS_VARLEN=geo.varlen, USE_F64=acc == torch.float64, K=cfg.bwd_chunk)
    if quad:
        dbias_part = _backward_split_state(geo, quad, warps, m, dn, nseg, seg_len, args, flags,
                                           x, B, C, dt_bias is not None and needs[7], states,
                                           acc, nout)
    else:
        tk.selective_scan_bwd_kernel[(geo.nseq, geo.n_dblocks)](
            *args, **flags, BLOCK_D=geo.block_d, BLOCK_N=geo.block_n, num_warps=1)
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

    dB = _group_sum(db_part, B.dtype) if needs[3] else None
    dC = _group_sum(dc_part, C.dtype) if needs[4] else None
    dA = da_part.sum(0).t().to(A.dtype) if needs[2] else None
    dD = dd_part.sum(0).to(D.dtype) if (D is not None and needs[5]) else None
    dbias = None
    if dbias_part is not None:
        dbias = dbias_part.sum(0).to(dt_bias.dtype)
    elif dt_bias is not None and needs[7]:
        # (summed in float32 without a float32 copy of ddt: 0.05 ms at B8 L2048 D2048)
        dbias = ddt.sum((0, 1), dtype=acc).to(dt_bias.dtype)
    dinit = dh0.transpose(1, 2).to(initial_state.dtype) if initial_state is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit


def _backward_split_state(geo, quad, warps, m, dn, nseg, seg_len, args, flags, x, B, C,
                          want_dbias, states, acc, nout):
    """Launch the split-state backward; returns dt_bias's per-(sequence, segment) partial
    gradient when the kernel sums it (else None: the caller sums dΔ)."""
    from ssmkit.ops.selective_scan import triton_split_state_bwd

    S = geo.N // quad
    pack, vec = _quad_rows(B, C, geo.N, S)
    grid = (geo.nseq, geo.n_dblocks, nseg)
    # per program and lane: the S states entering each of a group's M blocks
    scratch = (torch.empty(grid[0] * grid[1] * grid[2] * m * S * warps * 32, device=x.device,
                           dtype=acc) if m > 1 else states)
    # dt_bias's gradient summed in the kernel, per (sequence, segment) and channel
    dbias_part = torch.empty(nout, geo.dim, device=x.device, dtype=acc) if want_dbias else None
    kernel = triton_split_state_bwd.selective_scan_bwd_quad_kernel
    bd = 32 // quad  # channels per warp
    kw = dict(flags, Q=quad, S=S, EVEN_D=geo.even_d, PACK=pack, VEC=vec,
              IS_BF16=B.dtype == torch.bfloat16, V=-(-2 * S // bd) * bd, W=warps, M=m,
              STATE_DN=dn, DBIAS=dbias_part is not None, A_DN=geo.N,
              DIM_C=geo.dim, BCS_C=geo.G * geo.N, XW=0, num_warps=warps)
    if x.device.type == "cuda":
        kw["maxnreg"] = MAX_REGISTERS
    qargs = (*args, seg_len, nseg, scratch, dbias_part)
    if x.device.type == "cuda" and acc == torch.float32 and warps > 1:
        # the warps' dB, dC sums through the kernel's own shared buffer, where it fits
        kw["XW"] = int(_xw_fits(kernel, grid, qargs, kw))
    kernel[grid](*qargs, **kw)
    return dbias_part


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


def config_with_limit(state_mem_limit: int | None) -> ScanConfig:
    """The current config, with ``state_mem_limit`` replaced when given (a model's per-layer
    share of its budget for saved states)."""
    if state_mem_limit is None:
        return _CONFIG
    return dataclasses.replace(_CONFIG, state_mem_limit=int(state_mem_limit))


def forward_with_states(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens,
                        state_mem_limit=None):
    """The training forward outside autograd: ``(y, final_state, states, m, dn)``, the states
    saved for :func:`backward_from_states` as :func:`saved_states_layout` describes them (for
    ``torch.library`` ops, whose backward is a separate op); ``state_mem_limit`` overrides the
    config's bound on their bytes."""
    x, dt, A, B, C, D, z, dt_bias, initial_state, _ = _prepare(x, dt, A, B, C, D, z, dt_bias,
                                                              initial_state)
    cfg = config_with_limit(state_mem_limit)
    return _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens, True,
                    True, cfg, state_dn=_bwd_split(cfg, x, B, A)[0] > 0)


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
