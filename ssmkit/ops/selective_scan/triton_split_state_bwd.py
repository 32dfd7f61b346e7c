"""The split-state backward of the selective scan (:func:`selective_scan_bwd_quad_kernel`): a
channel's N states over Q lanes as in the split-state forward (:mod:`triton_split_state`, whose
lane helpers it shares), W warps per program, one saved state per block or, memory-bounded, per
M blocks. The algorithm is in the kernel's docstring.

Imported only through :mod:`ssmkit.ops.selective_scan.triton` when Triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton_split_state import (
    _lane_params,
    _lane_row,
    _lane_val,
    _load_state,
    _quad_allsum,
    _quad_sum_scatter,
    _step_delta,
)
from ssmkit.ops.selective_scan.triton_tile import (
    FAST_LOG,
    LN2,
    _delta,
    _ex2,
    _scatter_level,
    _sequence,
    _sigmoid,
)


@triton.jit
def _channel_sum_scatter(vals, lane, BD: tl.constexpr, AX: tl.constexpr = 0):
    """Sum the values of a tuple over the BD channels of a warp, whose lanes for one state
    group are ``j * BD .. j * BD + BD - 1`` (channel ``lane % BD``), leaving the lane of channel
    ``ch`` with the sums of values ``ch * m .. ch * m + m - 1`` (``m = len(vals) / BD``):
    :func:`_scatter_level` over the low log2(BD) lane bits."""
    V: tl.constexpr = len(vals)
    # (at the level of mask m a lane holds 2 V m / BD values and keeps half)
    if BD >= 32:
        vals = _scatter_level(vals, lane, V * 16 // BD, 16, AX)
    if BD >= 16:
        vals = _scatter_level(vals, lane, V * 8 // BD, 8, AX)
    if BD >= 8:
        vals = _scatter_level(vals, lane, V * 4 // BD, 4, AX)
    if BD >= 4:
        vals = _scatter_level(vals, lane, V * 2 // BD, 2, AX)
    if BD >= 2:
        vals = _scatter_level(vals, lane, V // BD, 1, AX)
    return vals


@triton.jit
def _bwd_block(t0, last, xd_base, bc_base, dim, bc_stride):
    """``(rem, xo, bo)`` of the backward's block from step ``t0``: ``rem = last - t0`` (int32;
    the block's steps ``s <= rem`` are in the segment, rows past it re-read row ``rem``) and the
    64-bit offsets of the block's first row in the ``(rows, dim)`` arrays and in B and C. A
    step's address is then a 32-bit offset from a per-block (uniform) pointer."""
    rem = (last - t0).to(tl.int32)
    return rem, xd_base + t0 * dim, bc_base + t0 * bc_stride


@triton.jit
def _adv_fetch(X, DT, B, cb, xd_base, bc_base, bc_stride, dim, oc, j, nb, lane, rem,
               Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr,
               PACK: tl.constexpr, VEC: tl.constexpr, CLAMP: tl.constexpr):
    """What :func:`_quad_advance` reads of block ``cb`` of the segment: ``x, dt`` of the lane's
    own steps (per group) and its words of the block's rows of B. The recompute
    advances past full blocks only (never the segment's last, the only partial one), so rows
    are not clamped, but with ``CLAMP`` (a fetch that may land on the last block, unused
    then): rows past ``rem`` re-read it."""
    xo = xd_base + cb * K * dim
    xdt = ()
    for gi in tl.static_range(K // Q):
        r = gi * Q + j
        if CLAMP:
            r = tl.minimum(r, rem)
        off = r * dim + oc
        xdt = xdt + ((tl.load(X + xo + off), tl.load(DT + xo + off)),)
    bo = bc_base + cb * K * bc_stride
    if CLAMP:
        rows = _bwd_fetch_rows(B, bo, rem, bc_stride, nb, lane, S, K, PACK, VEC)
    else:
        rows = ()
        for i in tl.static_range(K):
            rows = rows + (_lane_row(B + bo, i * bc_stride + nb, lane, S, PACK, VEC, False),)
    return xdt, rows


@triton.jit
def _quad_advance(h, fetched, A2, bias, md, nb, j, base, lane, bc_stride,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC,
                  Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr, PACK: tl.constexpr,
                  VEC: tl.constexpr, IS_BF16: tl.constexpr, BD: tl.constexpr):
    """This lane's states (a tuple of S states) after a full block of K
    steps, in the backward's lane mapping (a channel's lanes BD apart), from the block's inputs
    read by :func:`_adv_fetch` (``fetched``)."""
    xdt, brows = fetched
    for gi in tl.static_range(K // Q):
        x = xdt[gi][0].to(ACC)
        _, d = _delta(xdt[gi][1].to(ACC), bias, md, HAS_BIAS, SOFTPLUS)
        # (the rows come in brows: no B, no clamping)
        hg, _, _ = _quad_group_states(h, d, d * x, None, A2, gi * Q, K - 1, bc_stride, nb, base,
                                      lane, ACC, Q, S, PACK, VEC, IS_BF16, BD, brows)
        h = hg[Q - 1]
    return h


@triton.jit
def _quad_group_states(h, d, dx, Bb, A2, s0, rem, bc_stride, nb, base, lane, ACC,
                       Q: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr, VEC: tl.constexpr,
                       IS_BF16: tl.constexpr, BD: tl.constexpr, brows=None):
    """The Q steps of the group from step ``s0`` of the block whose first row of B is at ``Bb``,
    in the backward's lane mapping, from this lane's states ``h`` before it and its own step's
    ``Δ, Δ x`` (``d, dx``; the other steps' by shuffles):
    ``h_t[n] = exp(Δ_t A[n]) h_{t-1}[n] + Δ_t x_t B_t[n]``. Returns, per step, the states after
    it and its Δ and Δx (rows past ``rem`` re-read row ``rem``)."""
    hs = ()
    dis = ()
    dxis = ()
    for i in tl.static_range(Q):
        if brows is None:
            braw = _lane_row(Bb, tl.minimum(s0 + i, rem) * bc_stride + nb, lane, S, PACK,
                             VEC, False)
        else:  # (the rows loaded ahead by the caller)
            braw = brows[s0 + i]
        di, dxi = _step_delta(d, dx, base, i, Q, 1, BD)
        new = ()
        for k in tl.static_range(S):
            new = new + (_ex2(di * A2[k]) * h[k] + dxi * _lane_val(braw, k, PACK, IS_BF16, ACC),)
        h = new
        hs = hs + (h,)
        dis = dis + (di,)
        dxis = dxis + (dxi,)
    return hs, dis, dxis


@triton.jit
def _bwd_fetch(X, DT, DY, Z, cb, last, xd_base, dim, oc, j, HAS_Z: tl.constexpr,
               Q: tl.constexpr, K: tl.constexpr, MASKED: tl.constexpr):
    """The inputs a lane reads for its own steps of the backward's block ``cb`` (``x, dt, dy,
    z`` as stored, per group); ``MASKED``: zeros where the block lies outside the
    segment (a prefetch before the loop, where the segment may be empty)."""
    rem = (last - cb * K).to(tl.int32)
    xo = xd_base + cb * K * dim
    raws = ()
    for gi in tl.static_range(K // Q):
        r = tl.minimum(gi * Q + j, rem)
        ok = r >= 0
        off = r * dim + oc
        if MASKED:
            x = tl.load(X + xo + off, mask=ok, other=0.0)
            dt = tl.load(DT + xo + off, mask=ok, other=0.0)
            dy = tl.load(DY + xo + off, mask=ok, other=0.0)
            if HAS_Z:
                z = tl.load(Z + xo + off, mask=ok, other=0.0)
            else:
                z = x
        else:
            x = tl.load(X + xo + off)
            dt = tl.load(DT + xo + off)
            dy = tl.load(DY + xo + off)
            if HAS_Z:
                z = tl.load(Z + xo + off)
            else:
                z = x
        raws = raws + ((x, dt, dy, z),)
    return raws


@triton.jit
def _bwd_fetch_rows(B, bo, rem, bc_stride, nb, lane, S: tl.constexpr, K: tl.constexpr,
                    PACK: tl.constexpr, VEC: tl.constexpr):
    """This lane's words of the K rows of B from offset ``bo`` (rows past ``rem`` re-read it)."""
    rem = rem.to(tl.int32)
    Bb = B + bo
    rows = ()
    for i in tl.static_range(K):
        rows = rows + (_lane_row(Bb, tl.minimum(i, rem) * bc_stride + nb, lane, S, PACK, VEC,
                                 False),)
    return rows


@triton.jit
def _bwd_fetch_state(STATES, ck0, cb, oc, nb, dim, S: tl.constexpr, NST: tl.constexpr, ACC,
                     STATE_DN: tl.constexpr):
    """The saved state entering block ``cb`` (one per block)."""
    return _load_state(STATES + (ck0 + cb) * dim * NST, oc, nb, dim, NST, S, ACC, STATE_DN)


@triton.jit
def _bwd_quad_block(h, raws, brows, cb, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                    DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                    bc_base, bc_stride, part_base, row0, dim,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, ACC, Q: tl.constexpr, S: tl.constexpr,
                    K: tl.constexpr, PACK: tl.constexpr, VEC: tl.constexpr,
                    IS_BF16: tl.constexpr, BD: tl.constexpr, V: tl.constexpr,
                    W: tl.constexpr, DBIAS: tl.constexpr, XW: tl.constexpr = 0):
    """Block ``cb`` of the split-state backward (see the kernel), from the state entering it
    (``h``), the lane's own-step inputs (``raws``, :func:`_bwd_fetch`) and its words of the
    block's rows of B (``brows``, or None: loaded here): returns the adjoint
    state before it and the updated sums of dA, dD and dt_bias; ``XW``: see the kernel."""
    NG: tl.constexpr = K // Q
    M_OUT: tl.constexpr = V // BD
    NST: tl.constexpr = Q * S
    rem, xo, bo = _bwd_block(cb * K, last, xd_base, bc_base, dim, bc_stride)
    Bb = B + bo
    Cb = C + bo
    if XW:
        buf = (cb % 2).to(tl.int32)  # the half of the shared buffer this block uses
        wid = tl.arange(0, W)[:, None] + lane * 0
    # the block's rows of the dB, dC partial sums (the lane's state group added below)
    DBb = DB_PART + (part_base + row0 + cb * K) * NST + nb1
    DCb = DC_PART + (part_base + row0 + cb * K) * NST + nb1
    # Recompute the block. Per group: lane j's own step (x, Δ, dy, z, dtraw), and for every step
    # of the block the shared Δ, Δx and the states before / after it.
    hs = (h,)
    xs = ()
    ds = ()
    dtraws = ()
    dys = ()
    zs = ()
    dis = ()
    dxis = ()
    vlds = ()
    for gi in tl.static_range(NG):
        vld = md & (gi * Q + j <= rem)
        raw = raws[gi]  # x, dt, dy, z of lane j's step (fetched by the caller)
        x = raw[0].to(ACC)
        dtraw, d = _delta(raw[1].to(ACC), bias, vld, HAS_BIAS, SOFTPLUS)
        dys = dys + (tl.where(vld, raw[2].to(ACC), 0.0),)
        if HAS_Z:
            zs = zs + (raw[3].to(ACC),)
        xs = xs + (x,)
        ds = ds + (d,)
        dtraws = dtraws + (dtraw,)
        vlds = vlds + (vld,)
        hg, dg, dxg = _quad_group_states(h, d, d * x, Bb, A2, gi * Q, rem, bc_stride, nb,
                                         base, lane, ACC, Q, S, PACK, VEC, IS_BF16, BD, brows)
        h = hg[Q - 1]
        hs = hs + hg
        dis = dis + dg
        dxis = dxis + dxg
    # The gate's backward, lane j of each group for its own step: dy·z·σ(z) goes on.
    dygs = ()
    for gi in tl.static_range(NG):
        r = tl.minimum(gi * Q + j, rem)
        dyg = dys[gi]
        if HAS_Z:
            ps = ()
            for i in tl.static_range(Q):
                craw = _lane_row(Cb, tl.minimum(gi * Q + i, rem) * bc_stride + nb, lane,
                                 S, PACK, VEC, False)
                p = tl.zeros([W, 32], dtype=ACC)
                for k in tl.static_range(S):
                    p += hs[gi * Q + i + 1][k] * _lane_val(craw, k, PACK, IS_BF16, ACC)
                ps = ps + (p,)
            y = _quad_sum_scatter(ps, lane, Q, 1, BD)
            if HAS_D:
                y += Dv * xs[gi]
            z = zs[gi]
            sz = _sigmoid(z)
            dz = dyg * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(DZ + xo + (r * dim + oc), dz.to(DZ.dtype.element_ty), mask=vlds[gi])
            dyg = dyg * z * sz
        if HAS_D:
            dD_acc += dyg * xs[gi]
        dygs = dygs + (dyg,)
    # The adjoint, backwards through the block.
    for gi in tl.static_range(NG - 1, -1, -1):
        # per step of the group: this lane's Σ_k dh A2 h exp(ΔA), Σ_k dh B
        pa = ()
        pb = ()
        for i in tl.static_range(Q - 1, -1, -1):
            rs = tl.minimum(gi * Q + i, rem)
            if brows is None:
                braw = _lane_row(Bb, rs * bc_stride + nb, lane, S, PACK, VEC, False)
            else:
                braw = brows[gi * Q + i]
            craw = _lane_row(Cb, rs * bc_stride + nb, lane, S, PACK, VEC, False)
            if Q == 1:
                dyi = dygs[gi]
            else:
                dyi = tl.gather(dygs[gi], base + i * BD, 1)
            di = dis[gi * Q + i]
            dxi = dxis[gi * Q + i]
            ddtA = tl.zeros([W, 32], dtype=ACC)
            dhB = tl.zeros([W, 32], dtype=ACC)
            dbs = ()
            dcs = ()
            ndh = ()
            nacc = ()
            for k in tl.static_range(S):
                dhn = dh[k] + dyi * _lane_val(craw, k, PACK, IS_BF16, ACC)
                dhp = dhn * _ex2(di * A2[k])  # dh_{t-1}
                ddA = dhp * hs[gi * Q + i][k]  # d/d(ΔA) of exp(ΔA) h_{t-1}, times dh_t
                ddtA += ddA * A2[k]
                nacc = nacc + (dA_acc[k] + ddA * di,)
                dhB += dhn * _lane_val(braw, k, PACK, IS_BF16, ACC)
                # dB_t[n] = Σ_d dh_t[d, n] Δ_t[d] x_t[d]; dC_t[n] = Σ_d dy_t[d] h_t[d, n]
                dbs = dbs + (dhn * dxi,)
                dcs = dcs + (dyi * hs[gi * Q + i + 1][k],)
                ndh = ndh + (dhp,)
            dh = ndh
            dA_acc = nacc
            pa = (ddtA,) + pa
            pb = (dhB,) + pb
            vals = dbs + dcs
            for _p in tl.static_range(V - 2 * S):
                vals = vals + (tl.zeros([W, 32], dtype=ACC),)
            red = _channel_sum_scatter(vals, lane, BD, 1)
            if XW:
                # into this block's half of the shared buffer, summed over the warps below
                for rr in tl.static_range(M_OUT):
                    _sts(((((buf * K + gi * Q + i) * M_OUT + rr) * W + wid) * 32 + lane) * 4,
                         red[rr])
            else:
                for rr in tl.static_range(M_OUT):
                    tot = tl.sum(red[rr], axis=0)  # over the program's warps
                    idx = ch1 * M_OUT + rr  # value idx of this lane's state group
                    lim = tl.where(gi * Q + i <= rem, S, 0)  # rows past the segment: not stored
                    tl.store(DBb + (rs * NST + idx), tot.to(DB_PART.dtype.element_ty),
                             mask=idx < lim)
                    tl.store(DCb + (rs * NST + idx - S), tot.to(DC_PART.dtype.element_ty),
                             mask=(idx >= S) & (idx < 2 * lim))
        # lane j finishes step gi*Q + j: dΔ and dx
        r = tl.minimum(gi * Q + j, rem)
        ddtA = _quad_sum_scatter(pa, lane, Q, 1, BD)
        dhB = _quad_sum_scatter(pb, lane, Q, 1, BD)
        # A2 = A log2 e, so Σ_n ddA A_n = ln 2 Σ_n ddA A2_n
        ddt = ddtA * LN2 + dhB * xs[gi]
        dxo = dhB * ds[gi]
        if HAS_D:
            dxo += Dv * dygs[gi]
        if SOFTPLUS:
            ddt = tl.where(dtraws[gi] > 20.0, ddt, ddt * _sigmoid(dtraws[gi]))
        if DBIAS:
            db_acc += tl.where(vlds[gi], ddt, 0.0)
        off = r * dim + oc
        tl.store(DX + xo + off, dxo.to(DX.dtype.element_ty), mask=vlds[gi])
        tl.store(DDT + xo + off, ddt.to(DDT.dtype.element_ty), mask=vlds[gi])
    if XW:
        # The warps' dB, dC sums of the whole block: warp w adds up step w (and w + W, ...) of
        # every warp from shared memory and stores it; one barrier per block (the other half of
        # the buffer takes the next block, so no second one before it is written again).
        tl.debug_barrier()
        ch = lane % BD
        P = DB_PART + (part_base + row0 + cb * K) * NST + nb
        PC = DC_PART + (part_base + row0 + cb * K) * NST + nb
        for s0 in tl.static_range(0, K, W):
            st = s0 + wid  # the block's step this warp adds up
            okw = st < K
            sa = tl.minimum(st, K - 1)
            rs = tl.minimum(sa, rem)
            lim = tl.where(okw & (st <= rem), S, 0)
            for rr in tl.static_range(M_OUT):
                tot = _lds(((((buf * K + sa) * M_OUT + rr) * W) * 32 + lane) * 4)
                for w2 in tl.static_range(1, W):
                    tot += _lds(((((buf * K + sa) * M_OUT + rr) * W + w2) * 32 + lane) * 4)
                idx = ch * M_OUT + rr
                tl.store(P + (rs * NST + idx), tot.to(DB_PART.dtype.element_ty), mask=idx < lim)
                tl.store(PC + (rs * NST + idx - S), tot.to(DC_PART.dtype.element_ty),
                         mask=(idx >= S) & (idx < 2 * lim))
    return dh, dA_acc, dD_acc, db_acc


@triton.jit
def selective_scan_bwd_quad_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, STATES, CU, CHUNK_OFF, DY, DHT,
    DX, DDT, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DH0,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq, total_rows, seg_len, nseg,
    SCRATCH, DBIAS_PART,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr, EVEN_D: tl.constexpr,
    PACK: tl.constexpr, IS_BF16: tl.constexpr, V: tl.constexpr, VEC: tl.constexpr = 1,
    DIM_C: tl.constexpr = 0, W: tl.constexpr = 1, M: tl.constexpr = 1,
    STATE_DN: tl.constexpr = 0, BCS_C: tl.constexpr = 0,
    DBIAS: tl.constexpr = 0, A_DN: tl.constexpr = 0,
    XW: tl.constexpr = 0,
):
    """Backward with a channel's N states split over Q lanes, as the split-state forward (the
    tile backward's arguments, ``triton_tile.selective_scan_bwd_kernel``), with one saved state
    per block of K steps or, ``M > 1``, per M blocks
    (memory-bounded saving): per group of M blocks, in reverse, the program first runs the
    forward from the saved state over the group and keeps the block-start states in its slice
    of ``SCRATCH`` (``(programs, M, S, W * 32)``, each lane reading back what it wrote;
    small enough to stay in L2), then walks the group's blocks in reverse from those.

    Per block of K steps (a multiple of Q), in reverse: reload the block's start state, recompute
    its K states (lane j of a channel computes Δ of step j of each group of Q steps, shared by
    shuffles); the gate's backward needs ``y`` of each step, a reduce-scatter over the Q lanes as
    in the forward. Then the adjoint ``dh_{t-1} = exp(Δ_t A) dh_t`` (``dh_t += C_t dy_t``)
    backwards through the block. Per step, the sums over the channel's states (``Σ_n dh A h`` for
    dΔ, ``Σ_n dh B`` for dx) are kept per lane and reduce-scattered over the Q lanes once per
    group (lane j then finishes step j); the sums over the warp's channels (dB_t, dC_t: 2S values
    per lane) go through a butterfly over the lanes sharing a state index, after which each lane
    stores ``V * Q / 32`` values (``V`` = 2S padded to a multiple of 32 / Q) into the partial
    sums of this block of channels, added up by the caller. No atomics.

    ``W`` warps per program (``num_warps``), each with its own channels: tensors are
    ``(W, 32)``, lanes along axis 1 (shuffles stay within a warp), and the warps' dB, dC sums
    are added (through shared memory) before they are stored, so the partial sums are per block
    of ``W * 32 / Q`` channels: by Triton's reduction at every step, or (``XW``, GPU and
    float32 only, where the host has checked the compiled kernel's shared memory) through a
    buffer of the kernel's own, once per block with one barrier (see :func:`_sts`).
    ``DBIAS``: dt_bias's gradient summed here per channel (``DBIAS_PART``, ``(nseq * nseg,
    dim)`` as ``DD_PART``) instead of by a pass over dΔ. ``A_DN``: A read as ``(dim, N)``.
    Each block's saved state, own-step rows and rows of B are loaded a block ahead, so that
    their latency falls on the block before."""
    ACC = tl.float64 if USE_F64 else tl.float32
    BD: tl.constexpr = 32 // Q
    M_OUT: tl.constexpr = V // BD
    NST: tl.constexpr = Q * S  # = dstate
    if DIM_C > 0:  # dim known at compile time (immediate offsets), as in the forward
        dim = DIM_C
    bc_stride = ngroups * NST
    if BCS_C > 0:
        bc_stride = BCS_C
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    row0, seqlen, ck0 = _sequence(CU, CHUNK_OFF, pid_s, L, nchunks_per_seq, IS_VARLEN)
    t_begin = pid_g.to(tl.int64) * seg_len
    seqlen = tl.minimum(t_begin + seg_len, seqlen)  # from here on: the end of the segment
    g = pid_d // blocks_per_group
    # Lane l of a warp: channel l % BD, state group j = l // BD (the channels vary fastest, so
    # that Triton keeps one layout for loads and shuffles); a channel's lanes are BD apart.
    zw = tl.zeros([W, 32], dtype=tl.int32)
    lane = tl.arange(0, 32)[None, :] + zw
    j = lane // BD
    ch = lane % BD
    base = ch
    offs_d = pid_d * (W * BD) + (tl.arange(0, W)[:, None] + zw) * BD + ch
    nb = j * S
    seq_state_off = (pid_s.to(tl.int64) * nseg + pid_g) * dim * NST
    # (32,) index vectors for the stores of the warps' dB, dC sums, in the layout of a sum over
    # the warps (reduced once here, so that the loop converts no layouts)
    nb1 = tl.max(j * S, axis=0)
    ch1 = tl.max(ch, axis=0)
    # the lane's channel: offset (channels contiguous in runs of BD lanes: the hint keeps
    # Triton's stores and loads in the layout of the shuffles, one warp per row, instead of
    # converting through shared memory), mask and parameters
    if EVEN_D:
        oc = tl.max_contiguous(offs_d, [1, BD])
        md = zw == 0
    else:
        oc = tl.max_contiguous(tl.minimum(offs_d, dim - 1), [1, BD])
        md = offs_d < dim
    A2, dh, Dv, bias = _lane_params(A, DHT, D, DT_BIAS, seq_state_off, nb, oc, dim, S, HAS_DHT,
                                    HAS_D, HAS_BIAS, ACC, A_DN)
    dA_acc = ()
    for _ in tl.static_range(S):
        dA_acc = dA_acc + (tl.zeros([W, 32], dtype=ACC),)
    dD_acc = tl.zeros([W, 32], dtype=ACC)
    db_acc = tl.zeros([W, 32], dtype=ACC)
    part_base = pid_d.to(tl.int64) * total_rows
    # XW: the warps' dB, dC sums through a shared buffer of our own (GPU, float32, W > 1), two
    # halves of K * M_OUT * W * 32 values at the start of the kernel's shared memory. Triton
    # sizes that memory from its own needs: a reduction over the warps here makes it allocate
    # (its result only joins a comparison that is never true, which keeps it), and the host
    # checks the compiled kernel's size before using XW (selective_scan/triton.py); our
    # accesses start after a barrier, and Triton's own use none inside the loop.
    XWE: tl.constexpr = XW and FAST_LOG and not USE_F64 and W > 1
    if XWE:
        # ((W, 32, 2, 2, ...): the lanes' layout with 2 K M_OUT values per thread, reduced over
        # the warps: W * 32 * 2 K M_OUT words of scratch)
        XWV: tl.constexpr = 2 * K * M_OUT
        big = lane + pid_s
        if XWV >= 2:
            big = tl.join(big, big + 1)
        if XWV >= 4:
            big = tl.join(big, big + 1)
        if XWV >= 8:
            big = tl.join(big, big + 1)
        if XWV >= 16:
            big = tl.join(big, big + 1)
        if XWV >= 32:
            big = tl.join(big, big + 1)
        if XWV >= 64:
            big = tl.join(big, big + 1)
        big = tl.ravel(tl.max(big, axis=0), can_reorder=True)
        part_base += tl.where(tl.max(big, axis=0) < 0, 1, 0)
        tl.debug_barrier()
    xd_base = row0 * dim
    bc_base = row0 * bc_stride + g * NST
    last = seqlen - 1
    nchunks = tl.cdiv(seqlen - t_begin, K)
    c_first = t_begin // K
    KM: tl.constexpr = K * M
    ngroups_m = tl.cdiv(seqlen - t_begin, KM)
    prog = ((pid_s * tl.num_programs(1) + pid_d) * tl.num_programs(2) + pid_g).to(tl.int64)
    slot = (SCRATCH + prog * (M * S * W * 32)
            + (tl.arange(0, W)[:, None] + zw) * 32 + lane)
    if M == 1:
        # One saved state per block, and each block's loads issued a block ahead: the saved
        # state and the own-step rows come from DRAM and the rows of B from L2, so their
        # latency falls on the block before.
        cb0 = c_first + nchunks - 1
        # (the segment may be empty: then the first saved state, which always exists, stands
        # in; unmasked, so that the state keeps the layout of the loads in the loop)
        nxt_h = _bwd_fetch_state(STATES, ck0, tl.where(nchunks > 0, cb0, -ck0), oc, nb, dim, S,
                                 NST, ACC, STATE_DN)
        nxt_r = _bwd_fetch(X, DT, DY, Z, cb0, last, xd_base, dim, oc, j, HAS_Z, Q, K, True)
        # (an empty segment reads B's first row)
        nxt_b = _bwd_fetch_rows(B, tl.where(nchunks > 0, bc_base + cb0 * K * bc_stride,
                                            g * NST),
                                tl.where(nchunks > 0, last - cb0 * K, 0), bc_stride, nb,
                                lane, S, K, PACK, VEC)
        for gg in range(0, nchunks):
            h = nxt_h
            raws = nxt_r
            brows = nxt_b
            # (the first block's "block before" is itself again: a harmless re-read)
            cn = tl.maximum(cb0 - gg - 1, c_first)
            nxt_h = _bwd_fetch_state(STATES, ck0, cn, oc, nb, dim, S, NST, ACC, STATE_DN)
            nxt_r = _bwd_fetch(X, DT, DY, Z, cn, last, xd_base, dim, oc, j, HAS_Z, Q, K, False)
            nxt_b = _bwd_fetch_rows(B, bc_base + cn * K * bc_stride, last - cn * K,
                                    bc_stride, nb, lane, S, K, PACK, VEC)
            dh, dA_acc, dD_acc, db_acc = _bwd_quad_block(
                h, raws, brows, cb0 - gg, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                bc_base, bc_stride, part_base, row0, dim, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                ACC, Q, S, K, PACK, VEC, IS_BF16, BD, V, W, DBIAS, XWE)
    else:
        # Memory-bounded saving (M > 1): each group's saved state loaded a group ahead, its
        # first handled block's inputs before the recompute, and the recompute's inputs a
        # block ahead
        # (an empty segment: the first state, never used)
        nxt_s = _load_state(
            STATES + tl.where(ngroups_m > 0, ck0 + t_begin // KM + ngroups_m - 1, 0) * dim * NST,
            oc, nb, dim, NST, S, ACC, STATE_DN)
        for gg in range(0, ngroups_m):
            gm = ngroups_m - 1 - gg  # group of M blocks, from the last
            cg = c_first + gm * M  # the group's first block
            nblk = tl.minimum(nchunks - gm * M, M)  # its blocks inside the segment
            # the group's block-start states, from its saved state (the last one is not
            # advanced past: its block is the first handled below)
            h = nxt_s
            nxt_s = _load_state(STATES + (ck0 + t_begin // KM + tl.maximum(gm - 1, 0)) * dim * NST,
                                oc, nb, dim, NST, S, ACC, STATE_DN)
            # (clamped: a group of one block is the segment's last, maybe partial)
            nxt_a = _adv_fetch(X, DT, B, cg, xd_base, bc_base, bc_stride, dim, oc, j, nb,
                               lane, (last - cg * K).to(tl.int32), Q, S, K, PACK, VEC, True)
            nxt_r = _bwd_fetch(X, DT, DY, Z, cg + nblk - 1, last, xd_base, dim, oc, j,
                               HAS_Z, Q, K, False)
            nxt_b = _bwd_fetch_rows(B, bc_base + (cg + nblk - 1) * K * bc_stride,
                                    last - (cg + nblk - 1) * K, bc_stride, nb, lane, S,
                                    K, PACK, VEC)
            for m in range(0, nblk - 1):
                for k in tl.static_range(S):
                    tl.store(slot + (m * S + k) * (W * 32), h[k])
                cur = nxt_a
                # (the next block to advance past; at the group's last, itself again)
                nxt_a = _adv_fetch(X, DT, B, tl.minimum(cg + m + 1, cg + nblk - 2),
                                   xd_base, bc_base, bc_stride, dim, oc, j, nb, lane, 0,
                                   Q, S, K, PACK, VEC, False)
                h = _quad_advance(h, cur, A2, bias, md, nb, j, base, lane, bc_stride,
                                  HAS_BIAS, SOFTPLUS, ACC, Q, S, K, PACK, VEC, IS_BF16, BD)
            for k in tl.static_range(S):
                tl.store(slot + ((nblk - 1) * S + k) * (W * 32), h[k])
            # within the group, each block's own-step rows and rows of B loaded a block
            # ahead, as in the loop above; the states come from the L2 scratch
            for mm in range(0, nblk):
                cb = cg + nblk - 1 - mm
                hb = ()
                for k in tl.static_range(S):
                    hb = hb + (tl.load(slot + ((nblk - 1 - mm) * S + k) * (W * 32)),)
                raws = nxt_r
                brows = nxt_b
                cn = tl.maximum(cb - 1, cg)
                nxt_r = _bwd_fetch(X, DT, DY, Z, cn, last, xd_base, dim, oc, j, HAS_Z, Q, K,
                                   False)
                nxt_b = _bwd_fetch_rows(B, bc_base + cn * K * bc_stride, last - cn * K,
                                        bc_stride, nb, lane, S, K, PACK, VEC)
                dh, dA_acc, dD_acc, db_acc = _bwd_quad_block(
                    hb, raws, brows, cb, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                    DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                    bc_base, bc_stride, part_base, row0, dim, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                    ACC, Q, S, K, PACK, VEC, IS_BF16, BD, V, W, DBIAS, XWE)
    po = (pid_s.to(tl.int64) * nseg + pid_g) * dim
    for k in tl.static_range(S):
        tl.store(DH0 + seq_state_off + (nb + k) * dim + oc, dh[k].to(DH0.dtype.element_ty),
                 mask=md)
        tl.store(DA_PART + seq_state_off + (nb + k) * dim + oc,
                 dA_acc[k].to(DA_PART.dtype.element_ty), mask=md)
    if HAS_D:
        tot = _quad_allsum(dD_acc, lane, Q, 1, BD)
        tl.store(DD_PART + po + oc, tot.to(DD_PART.dtype.element_ty), mask=md & (j == 0))
    if DBIAS:
        tot = _quad_allsum(db_acc, lane, Q, 1, BD)
        tl.store(DBIAS_PART + po + oc, tot.to(DBIAS_PART.dtype.element_ty), mask=md & (j == 0))


@triton.jit
def _sts(off, v):
    """Store float32 ``v`` at byte ``off`` of the kernel's shared memory (the buffer Triton
    allocates, ``global_smem``; see the backward's ``XW``)."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, global_smem; add.u32 a, a, $1; st.shared.b32 [a], $2; }"
        "\n\tmov.u32 $0, 0;", "=r,r,r", [off, v.to(tl.int32, bitcast=True)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def _lds(off):
    """The float32 at byte ``off`` of the kernel's shared memory (see :func:`_sts`)."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, global_smem; add.u32 a, a, $1; ld.shared.b32 $0, [a]; }",
        "=r,r", [off], dtype=tl.int32, is_pure=False, pack=1).to(tl.float32, bitcast=True)
