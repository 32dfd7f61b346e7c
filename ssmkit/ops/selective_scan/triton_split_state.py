"""Selective scan kernels with a channel's N states split over Q lanes: the forward
(:func:`selective_scan_fwd_quad_kernel`) and the lane helpers it shares with the backward
(:mod:`triton_split_state_bwd`). Both are the defaults on CUDA (``ScanConfig.fwd_quad``,
``ScanConfig.bwd_quad``; H100 at B8 D2048 N16 L2048 bf16: forward 0.27 ms, forward + backward
1.41 ms, against 0.60 and 3.05 for mamba_ssm).

Imported only through :mod:`ssmkit.ops.selective_scan.triton` when Triton is installed.

Why: with one channel per lane (the tile kernels), batch 8 x 2,048 channels is 512 warps, about
one warp per scheduler of an H100, and every step's latency is exposed (~650 cycles per step
where the special-function unit needs ~160). Splitting a channel's states over Q lanes gives Q
times the warps without a second pass over the exponentials, and the per-channel work is spread
too instead of being repeated: the Q lanes of a channel walk the sequence in groups of Q steps,
and lane j of the group

* loads ``x, dt, z`` of step j only and computes that step's ``Δ = softplus(dt + dt_bias)`` and
  ``Δ x``, which the Q lanes then read from it with one shuffle each (``tl.gather`` within a warp);
* updates its S = N / Q states for each of the Q steps (Gu & Dao 2023, Algorithm 2):
  ``h[n] = exp(Δ A[n]) h[n] + Δ x B[n]`` and accumulates its share ``Σ_n C[n] h[n]`` of each y;
* gets, after the group, ``y`` of step j by a butterfly reduce-scatter of the Q partial sums
  across the Q lanes (Q - 1 shuffles), then adds ``D x``, applies the gate ``y · silu(z)`` and
  stores it.

So per step and lane: S exponentials, one softplus and one gate per Q steps (the same count of
special-function results per channel as one lane per channel), about three shuffles. Every other
part (saved states for the backward, segments, packed sequences, groups, initial and final
states) follows :func:`~ssmkit.ops.selective_scan.triton_tile.selective_scan_fwd_tile_kernel`,
whose arguments this kernel takes, so the host code swaps one for the other.

Lane ``l`` of the (one-warp) program: channel ``pid_d * 32/Q + l // Q``, states
``(l % Q) * S .. (l % Q) * S + S - 1``. The backward splits the states the same way but
lays a program's W warps out as ``(W, 32)`` tiles with the channels fastest along the lanes
(see its docstring).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton_tile import (
    FAST_LOG,
    LOG2E,
    _block_ptrs,
    _delta,
    _ex2,
    _row_val,
    _scatter_level,
    _segment_rows,
    _sigmoid,
)


@triton.jit
def _ld_words(P32, ok, VEC: tl.constexpr, MASKED: tl.constexpr):
    """``VEC`` (1, 2 or 4) consecutive 32-bit words at ``P32`` (per lane) as a tuple; zeros where
    ``ok`` is false when ``MASKED``. On the GPU one vector load through the read-only path
    (``ld.global.nc.v2/v4``: B, C and the saved states are never written by the kernel reading
    them): Triton issues one load per word for a tuple of scalars, each with its own 64-bit
    address arithmetic."""
    if FAST_LOG and VEC == 2 and not MASKED:
        out = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [P32],
                                        dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    elif FAST_LOG and VEC == 4 and not MASKED:
        out = tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
                                        "=r,=r,=r,=r,l", [P32],
                                        dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                        is_pure=True, pack=1)
    else:
        out = ()
        for w in tl.static_range(VEC):
            if MASKED:
                out = out + (tl.load(P32 + w, mask=ok, other=0),)
            else:
                out = out + (tl.load(P32 + w),)
    return out


@triton.jit
def _lane_row(P, off, ok, S: tl.constexpr, PACK: tl.constexpr, VEC: tl.constexpr,
              MASKED: tl.constexpr):
    """This lane's S values of a row of B or C at ``P + off`` (``off`` per lane), as a tuple of
    32-bit words (two 16-bit values each with ``PACK == 2``; float32 values with ``PACK == 32``,
    bit-cast by :func:`_lane_val`) loaded ``VEC`` words at a time, or of S values (``PACK == 1``).
    ``MASKED``: zeros where ``ok`` is false."""
    vals = ()
    if PACK == 1:
        for k in tl.static_range(S):
            if MASKED:
                vals = vals + (tl.load(P + off + k, mask=ok, other=0.0),)
            else:
                vals = vals + (tl.load(P + off + k),)
    else:
        P32 = (P + off).to(tl.pointer_type(tl.int32))
        NW: tl.constexpr = S // 2 if PACK == 2 else S
        for w in tl.static_range(NW // VEC):
            vals = vals + _ld_words(P32 + w * VEC, ok, VEC, MASKED)
    return vals


@triton.jit
def _lane_val(raw, k: tl.constexpr, PACK: tl.constexpr, IS_BF16: tl.constexpr,
              ACC: tl.constexpr):
    """Value ``k`` of a row from :func:`_lane_row`, as ``ACC``."""
    if PACK == 32:
        out = raw[k].to(tl.float32, bitcast=True)
    else:
        out = _row_val(raw, k, PACK, IS_BF16, ACC)
    return out


@triton.jit
def _quad_load(Xc, DTc, Zc, Bc, Cc, o, rem, dim, z_rs, b_rs, c_rs, oc, j, nb, lane,
               HAS_Z: tl.constexpr, Q: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr,
               VEC: tl.constexpr, MODE: tl.constexpr):
    """Inputs of the group of Q steps ``o .. o+Q-1`` after the block's first row (``Xc`` etc.
    point at it; ``rem`` = the last step of the segment, relative to it): ``x, dt, z`` of step
    ``o + j`` for lane j of a channel, and this lane's S values of the rows of B and C of every
    step of the group.

    ``MODE``: 0 = the rows exist (a full block); 1 = clamp rows past ``rem`` to it (the last,
    partial block: those steps get Δ = 0 and are not stored); 2 = mask them (zeros), for
    prefetching past the block, where the segment may even be empty."""
    r = o + j
    if MODE == 1:
        r = tl.minimum(r, rem)
    if MODE == 2:
        ok = r <= rem
        x = tl.load(Xc + r * dim + oc, mask=ok, other=0.0)
        dt = tl.load(DTc + r * dim + oc, mask=ok, other=0.0)
        if HAS_Z:
            z = tl.load(Zc + r * z_rs + oc, mask=ok, other=0.0)
        else:
            z = x
    else:
        x = tl.load(Xc + r * dim + oc)
        dt = tl.load(DTc + r * dim + oc)
        if HAS_Z:
            z = tl.load(Zc + r * z_rs + oc)
        else:
            z = x
    bs = ()
    cs = ()
    for i in tl.static_range(Q):
        ri = o + i
        if MODE == 2:
            # (a per-lane compare, not a scalar bool: the interpreter mis-types mask & scalar)
            oki = lane < tl.where(ri <= rem, 32, 0)
            bs = bs + (_lane_row(Bc, ri * b_rs + nb, oki, S, PACK, VEC, True),)
            cs = cs + (_lane_row(Cc, ri * c_rs + nb, oki, S, PACK, VEC, True),)
        else:
            if MODE == 1:
                ri = tl.minimum(rem, ri)
            bs = bs + (_lane_row(Bc, ri * b_rs + nb, lane, S, PACK, VEC, False),)
            cs = cs + (_lane_row(Cc, ri * c_rs + nb, lane, S, PACK, VEC, False),)
    return x, dt, z, bs, cs


@triton.jit
def _lane_params(A, H, D, DT_BIAS, h_off, nb, oc, dim, S: tl.constexpr, HAS_H: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                 A_DN: tl.constexpr = 0):
    """``(A2, h, D, dt_bias)`` of a lane: its S values of ``A log2 e`` (so that exp(Δ A) =
    exp2(Δ A2); A ``(N, dim)``, or ``(dim, A_DN)`` with ``A_DN = N``: the caller's own layout,
    no transposed copy) and of the state at ``H + h_off`` (``(.., N, dim)``; zeros without one),
    and its channel's D and dt_bias (zeros where absent)."""
    A2 = ()
    h = ()
    for k in tl.static_range(S):
        if A_DN > 0:
            a = tl.load(A + oc * A_DN + (nb + k))
        else:
            a = tl.load(A + (nb + k) * dim + oc)
        A2 = A2 + (a.to(ACC) * LOG2E,)
        if HAS_H:
            h = h + (tl.load(H + h_off + (nb + k) * dim + oc).to(ACC),)
        else:
            h = h + (tl.zeros(oc.shape, dtype=ACC),)
    if HAS_D:
        Dv = tl.load(D + oc).to(ACC)
    else:
        Dv = tl.zeros(oc.shape, dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(DT_BIAS + oc).to(ACC)
    else:
        bias = tl.zeros(oc.shape, dtype=ACC)
    return A2, h, Dv, bias


@triton.jit
def _step_delta(d, dx, base, i: tl.constexpr, Q: tl.constexpr, AX: tl.constexpr = 0,
                QS: tl.constexpr = 1):
    """``(Δ, Δ x)`` of step i of the group, from the channel's lane i (``base``: the channel's
    first lane, its lanes ``QS`` apart), one shuffle each (``AX``: the lanes' axis)."""
    if Q == 1:
        out = (d, dx)
    else:
        out = (tl.gather(d, base + i * QS, AX), tl.gather(dx, base + i * QS, AX))
    return out


@triton.jit
def _quad_sum_scatter(vals, lane, Q: tl.constexpr, AX: tl.constexpr = 0, QS: tl.constexpr = 1):
    """Sum Q values over the Q lanes of a channel (``QS`` apart), leaving lane j of the channel
    with the sum of value j: the butterfly of :func:`_scatter_level` over the log2(Q) lane bits
    of the channel's lanes (at the level of mask m a lane holds 2m values and keeps m)."""
    if Q >= 16:
        vals = _scatter_level(vals, lane, 8, 8 * QS, AX)
    if Q >= 8:
        vals = _scatter_level(vals, lane, 4, 4 * QS, AX)
    if Q >= 4:
        vals = _scatter_level(vals, lane, 2, 2 * QS, AX)
    if Q >= 2:
        vals = _scatter_level(vals, lane, 1, QS, AX)
    return vals[0]


@triton.jit
def _quad_allsum(v, lane, Q: tl.constexpr, AX: tl.constexpr = 0, QS: tl.constexpr = 1):
    """Sum of ``v`` over the Q lanes of a channel (``QS`` apart), in each of them."""
    if Q >= 2:
        v = v + tl.gather(v, lane ^ QS, AX)
    if Q >= 4:
        v = v + tl.gather(v, lane ^ (2 * QS), AX)
    if Q >= 8:
        v = v + tl.gather(v, lane ^ (4 * QS), AX)
    if Q >= 16:
        v = v + tl.gather(v, lane ^ (8 * QS), AX)
    return v


@triton.jit
def _save_state(sb, h, oc, nb, dim, dstate, mask, S: tl.constexpr, DN: tl.constexpr):
    """Store this lane's S states (``nb ..`` of channel ``oc``) into the saved state at ``sb``:
    ``(N, dim)`` (S stores, 4 rows per warp store), or with ``DN`` ``(dim, N)``, where a lane's
    S values are adjacent and the warp's 512 bytes contiguous: one vector store per lane on the
    GPU. (Streaming stores measured no faster: H100, 2026-11-27, 1.956 ms against 1.909
    per training step at B8 L2048 D2048.)"""
    if DN:
        P = sb + oc * dstate + nb
        if FAST_LOG and S == 4 and P.dtype.element_ty == tl.float32:
            # (predicated: the mask as a 32-bit operand)
            # (all operands integers: inline asm broadcasts its operands like a binary op,
            # which refuses a pointer beside a float)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $6, 0; "
                "@p st.global.v4.b32 [$1], {$2, $3, $4, $5}; }\n\tmov.u32 $0, 0;",
                "=r,l,r,r,r,r,r",
                [P.to(tl.int64), h[0].to(tl.int32, bitcast=True), h[1].to(tl.int32, bitcast=True),
                 h[2].to(tl.int32, bitcast=True), h[3].to(tl.int32, bitcast=True),
                 mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
        else:
            for k in tl.static_range(S):
                tl.store(P + k, h[k].to(P.dtype.element_ty), mask=mask)
    else:
        for k in tl.static_range(S):
            tl.store(sb + (nb + k) * dim + oc, h[k].to(sb.dtype.element_ty), mask=mask)


@triton.jit
def _load_state(sb, oc, nb, dim, dstate, S: tl.constexpr, ACC, DN: tl.constexpr):
    """This lane's S states from the saved state at ``sb`` (layout as :func:`_save_state`);
    ``oc`` must be an in-bounds channel (unmasked loads)."""
    h = ()
    if DN:
        P = sb + oc * dstate + nb
        if FAST_LOG and S == 4 and P.dtype.element_ty == tl.float32:
            w = _ld_words(P.to(tl.pointer_type(tl.int32)), oc >= 0, 4, False)
            for k in tl.static_range(S):
                h = h + (w[k].to(tl.float32, bitcast=True).to(ACC),)
        else:
            for k in tl.static_range(S):
                h = h + (tl.load(P + k).to(ACC),)
    else:
        for k in tl.static_range(S):
            h = h + (tl.load(sb + (nb + k) * dim + oc).to(ACC),)
    return h


@triton.jit
def _quad_block(h, dsum, pipe, c, t_begin, last, xd_base, z_base, b_base, c_base, ck0,
                X, DT, Z, B, C, Y, STATES, A2, Dv, bias, dim, dstate, z_rs, b_rs, c_rs,
                oc, md, j, nb, lane, base,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, ACC: tl.constexpr,
                Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr, KS: tl.constexpr,
                PF: tl.constexpr, EVEN_D: tl.constexpr, STORE_Y: tl.constexpr,
                STORE_DSUM: tl.constexpr, PACK: tl.constexpr, IS_BF16: tl.constexpr,
                VEC: tl.constexpr, CLAMP: tl.constexpr, NEXT_CLAMP: tl.constexpr,
                DN: tl.constexpr = 0):
    """Block ``c`` of K steps (K // Q groups). ``pipe``: the inputs of the next PF groups, loaded
    ahead; each group issues the loads of the group PF later (the next block's first ones in the
    last groups; PF * Q <= K, so they lie in the next block) before it computes, and returns the
    pipe for the next block. ``CLAMP``: the partial last block, rows clamped to the segment's
    last one; ``NEXT_CLAMP``: the last full block, whose prefetch of the next block's rows is
    clamped so."""
    rem, Xc, DTc, Yc, Zc, Bc, Cc = _block_ptrs(X, DT, Y, Z, B, C, t_begin + c * K, last,
                                               xd_base, z_base, b_base, c_base, dim, z_rs,
                                               b_rs, c_rs, HAS_Z)
    NG: tl.constexpr = K // Q
    for g in tl.static_range(NG):
        # the group PF later: in this block (rows known to exist unless CLAMP), or the next
        # block's, which exists when a full block follows; in the last full block (NEXT_CLAMP)
        # those rows are clamped to the segment's last one (this block has it: rem >= 0), and
        # the partial block that uses them gives steps past it Δ = 0
        nxt = _quad_load(Xc, DTc, Zc, Bc, Cc, (g + PF) * Q, rem, dim, z_rs, b_rs, c_rs, oc,
                         j, nb, lane, HAS_Z, Q, S, PACK, VEC,
                         1 if (CLAMP or (NEXT_CLAMP and g + PF >= NG)) else 0)
        xr, dtr, zr, bs, cs = pipe[0]
        shifted = ()
        for q in tl.static_range(1, PF):
            shifted = shifted + (pipe[q],)
        pipe = shifted + (nxt,)
        if CLAMP:
            vld = md & (g * Q + j <= rem)
        else:
            vld = md
        x = xr.to(ACC)
        _, d = _delta(dtr.to(ACC), bias, vld, HAS_BIAS, SOFTPLUS)  # Δ of step g*Q + j
        dx = d * x
        if STORE_DSUM:
            dsum += d
        ps = ()
        for i in tl.static_range(Q):
            jt = g * Q + i
            if SAVE_STATES and KS > K and jt == 0:
                # one state every KS // K blocks (the backward recomputes the ones between)
                sb = STATES + (ck0 + c // (KS // K)) * dim * dstate
                sm = md & (lane < tl.where(c % (KS // K) == 0, 32, 0))
                _save_state(sb, h, oc, nb, dim, dstate, sm, S, DN)
            elif SAVE_STATES and KS <= K and jt % KS == 0:
                # the state entering steps jt .. jt+KS-1, for the backward
                sb = STATES + (ck0 + c * (K // KS) + jt // KS) * dim * dstate
                if CLAMP:  # blocks that start past the segment end do not exist
                    sm = md & (lane < tl.where(rem >= jt, 32, 0))
                else:
                    sm = md
                _save_state(sb, h, oc, nb, dim, dstate, sm, S, DN)
            di, dxi = _step_delta(d, dx, base, i, Q)
            new = ()
            p = tl.zeros_like(di)
            for k in tl.static_range(S):
                # h[n] = exp2(Δ A[n] log2 e) h[n] + Δ x B[n];  y += C[n] h[n]
                hk = _ex2(di * A2[k]) * h[k] + dxi * _lane_val(bs[i], k, PACK, IS_BF16, ACC)
                if k == 0:
                    p = hk * _lane_val(cs[i], k, PACK, IS_BF16, ACC)
                else:
                    p += hk * _lane_val(cs[i], k, PACK, IS_BF16, ACC)
                new = new + (hk,)
            h = new
            ps = ps + (p,)
        if STORE_Y:
            y = _quad_sum_scatter(ps, lane, Q)  # y of step g*Q + j
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                z = zr.to(ACC)
                y = y * z * _sigmoid(z)
            yp = Yc + (g * Q + j) * dim + oc
            if CLAMP or not EVEN_D:
                tl.store(yp, y.to(Y.dtype.element_ty), mask=vld)
            else:
                tl.store(yp, y.to(Y.dtype.element_ty))
    return h, dsum, pipe


@triton.jit
def selective_scan_fwd_quad_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, H0, Y, HT, STATES, CU, CHUNK_OFF, DSUM,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq, z_rs, b_rs, c_rs, seg_len, nseg,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, PF: tl.constexpr,
    EVEN_D: tl.constexpr, STORE_Y: tl.constexpr, STORE_DSUM: tl.constexpr,
    PACK: tl.constexpr, IS_BF16: tl.constexpr, VEC: tl.constexpr = 1,
    DIM_C: tl.constexpr = 0, ZRS_C: tl.constexpr = 0, BRS_C: tl.constexpr = 0,
    CRS_C: tl.constexpr = 0, STATE_DN: tl.constexpr = 0, A_DN: tl.constexpr = 0,
):
    """One program: sequence ``program_id(0)``, channels ``program_id(1) * 32/Q ..`` (one warp),
    segment ``program_id(2)`` of ``seg_len`` steps. ``Q`` lanes per channel with ``S = N / Q``
    states each; ``K`` steps per loop iteration (a multiple of Q); ``KS`` the spacing of the
    saved states (a divisor or a multiple of K); ``PF`` groups loaded ahead (PF * Q <= K).
    Shapes as the tile kernels: x, dt, z, y ``(rows, dim)`` (z, B, C with row strides
    ``z_rs, b_rs, c_rs``), A and the states ``(.., N, dim)``, B and C ``(rows, G, N)``."""
    ACC = tl.float64 if USE_F64 else tl.float32
    BD: tl.constexpr = 32 // Q
    # strides known at compile time (the per-step addresses become immediate offsets)
    if DIM_C > 0:
        dim = DIM_C
    if ZRS_C > 0:
        z_rs = ZRS_C
    if BRS_C > 0:
        b_rs = BRS_C
    if CRS_C > 0:
        c_rs = CRS_C
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    t_begin, t_end, ck0, xd_base, z_base, b_base, c_base = _segment_rows(
        CU, CHUNK_OFF, pid_s, pid_g, pid_d, L, nchunks_per_seq, seg_len, blocks_per_group, dim,
        dstate, z_rs, b_rs, c_rs, IS_VARLEN)
    lane = tl.arange(0, 32)
    j = lane % Q
    base = lane - j  # the channel's first lane
    offs_d = pid_d * BD + lane // Q
    md = offs_d < dim
    oc = tl.minimum(offs_d, dim - 1)  # in-bounds channel for unmasked loads
    nb = j * S  # this lane's first state
    seq_state_off = (pid_s.to(tl.int64) * nseg + pid_g) * dim * dstate
    A2, h, Dv, bias = _lane_params(A, H0, D, DT_BIAS, seq_state_off, nb, oc, dim, S, HAS_H0,
                                   HAS_D, HAS_BIAS, ACC, A_DN)
    last = t_end - 1
    ck0 = ck0 + t_begin // KS
    dsum = tl.zeros([32], dtype=ACC)
    # the first PF groups of the segment (masked: it may be empty)
    rem0 = (last - t_begin).to(tl.int32)
    xo = xd_base + t_begin * dim
    Zb = Z + (z_base + t_begin * z_rs) if HAS_Z else X + xo
    Bb = B + (b_base + t_begin * b_rs)
    Cb = C + (c_base + t_begin * c_rs)
    pipe = (_quad_load(X + xo, DT + xo, Zb, Bb, Cb, 0, rem0, dim, z_rs, b_rs, c_rs, oc, j, nb,
                       lane, HAS_Z, Q, S, PACK, VEC, 2),)
    for q in tl.static_range(1, PF):
        pipe = pipe + (_quad_load(X + xo, DT + xo, Zb, Bb, Cb, q * Q, rem0, dim, z_rs, b_rs,
                                  c_rs, oc, j, nb, lane, HAS_Z, Q, S, PACK, VEC, 2),)
    # full blocks without clamps, then at most one partial block with them
    nfull = (t_end - t_begin) // K
    nblocks = tl.cdiv(t_end - t_begin, K)
    for c in range(0, nfull - 1):
        h, dsum, pipe = _quad_block(h, dsum, pipe, c, t_begin, last, xd_base, z_base, b_base,
                                    c_base, ck0, X, DT, Z, B, C, Y, STATES, A2, Dv, bias, dim,
                                    dstate, z_rs, b_rs, c_rs, oc, md, j, nb, lane, base, HAS_D,
                                    HAS_Z, HAS_BIAS, SOFTPLUS, SAVE_STATES, ACC, Q, S, K, KS,
                                    PF, EVEN_D, STORE_Y, STORE_DSUM, PACK, IS_BF16, VEC, False,
                                    False, STATE_DN)
    for c in range(tl.maximum(nfull - 1, 0), nfull):  # the last full block
        h, dsum, pipe = _quad_block(h, dsum, pipe, c, t_begin, last, xd_base, z_base, b_base,
                                    c_base, ck0, X, DT, Z, B, C, Y, STATES, A2, Dv, bias, dim,
                                    dstate, z_rs, b_rs, c_rs, oc, md, j, nb, lane, base, HAS_D,
                                    HAS_Z, HAS_BIAS, SOFTPLUS, SAVE_STATES, ACC, Q, S, K, KS,
                                    PF, EVEN_D, STORE_Y, STORE_DSUM, PACK, IS_BF16, VEC, False,
                                    True, STATE_DN)
    for c in range(nfull, nblocks):
        h, dsum, pipe = _quad_block(h, dsum, pipe, c, t_begin, last, xd_base, z_base, b_base,
                                    c_base, ck0, X, DT, Z, B, C, Y, STATES, A2, Dv, bias, dim,
                                    dstate, z_rs, b_rs, c_rs, oc, md, j, nb, lane, base, HAS_D,
                                    HAS_Z, HAS_BIAS, SOFTPLUS, SAVE_STATES, ACC, Q, S, K, KS,
                                    PF, EVEN_D, STORE_Y, STORE_DSUM, PACK, IS_BF16, VEC, True,
                                    True, STATE_DN)
    if STORE_HT:
        for k in tl.static_range(S):
            tl.store(HT + seq_state_off + (nb + k) * dim + oc, h[k].to(HT.dtype.element_ty),
                     mask=md)
    if STORE_DSUM:
        tot = _quad_allsum(dsum, lane, Q)
        tl.store(DSUM + (pid_s.to(tl.int64) * nseg + pid_g) * dim + oc,
                 tot.to(DSUM.dtype.element_ty), mask=md & (j == 0))
