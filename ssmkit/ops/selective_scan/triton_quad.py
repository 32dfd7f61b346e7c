"""Selective scan kernels with a channel's N states split over Q lanes ("quad" layout): the
forward (:func:`selective_scan_fwd_quad_kernel`) and the backward
(:func:`selective_scan_bwd_quad_kernel`), both the defaults on CUDA (``ScanConfig.fwd_quad``,
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
states) follows :func:`~ssmkit.ops.selective_scan.triton_kernels.selective_scan_fwd_tile_kernel_v2`,
whose arguments this kernel takes, so the host code swaps one for the other.

Lane ``l`` of the (one-warp) program: channel ``pid_d * 32/Q + l // Q``, states
``(l % Q) * S .. (l % Q) * S + S - 1``. The backward splits the states the same way but
lays a program's W warps out as ``(W, 32)`` tiles with the channels fastest along the lanes
(see its docstring).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ssmkit.ops.selective_scan.triton_kernels import (
    FAST_LOG,
    LN2,
    LOG2E,
    _block_ptrs,
    _delta,
    _ex2,
    _row_val,
    _scatter_level,
    _segment_rows,
    _sequence,
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
    GPU. (Streaming stores measured no faster: H100, session 6, call 5, 1.956 ms against 1.909
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
               Q: tl.constexpr, S: tl.constexpr, K: tl.constexpr, CPL: tl.constexpr,
               PACK: tl.constexpr, VEC: tl.constexpr, CLAMP: tl.constexpr):
    """What :func:`_quad_advance` reads of block ``cb`` of the segment: ``x, dt`` of the lane's
    own steps (per group and channel) and its words of the block's rows of B. The recompute
    advances past full blocks only (never the segment's last, the only partial one), so rows
    are not clamped, but with ``CLAMP`` (a fetch that may land on the last block, unused
    then): rows past ``rem`` re-read it."""
    xo = xd_base + cb * K * dim
    xdt = ()
    for gi in tl.static_range(K // Q):
        r = gi * Q + j
        if CLAMP:
            r = tl.minimum(r, rem)
        rc = ()
        for c in tl.static_range(CPL):
            off = r * dim + oc[c]
            rc = rc + ((tl.load(X + xo + off), tl.load(DT + xo + off)),)
        xdt = xdt + (rc,)
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
                  VEC: tl.constexpr, IS_BF16: tl.constexpr, BD: tl.constexpr,
                  CPL: tl.constexpr):
    """This lane's states (a tuple over its CPL channels of S states) after a full block of K
    steps, in the backward's lane mapping (a channel's lanes BD apart), from the block's inputs
    read by :func:`_adv_fetch` (``fetched``)."""
    xdt, brows = fetched
    for gi in tl.static_range(K // Q):
        ds = ()
        dxs = ()
        for c in tl.static_range(CPL):
            x = xdt[gi][c][0].to(ACC)
            _, d = _delta(xdt[gi][c][1].to(ACC), bias[c], md[c], HAS_BIAS, SOFTPLUS)
            ds = ds + (d,)
            dxs = dxs + (d * x,)
        # (the rows come in brows: no B, no clamping)
        hg, _, _ = _quad_group_states(h, ds, dxs, None, A2, gi * Q, K - 1, bc_stride, nb, base,
                                      lane, ACC, Q, S, PACK, VEC, IS_BF16, BD, CPL, brows)
        h = hg[Q - 1]
    return h


@triton.jit
def _quad_group_states(h, d, dx, Bb, A2, s0, rem, bc_stride, nb, base, lane, ACC,
                       Q: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr, VEC: tl.constexpr,
                       IS_BF16: tl.constexpr, BD: tl.constexpr, CPL: tl.constexpr,
                       brows=None):
    """The Q steps of the group from step ``s0`` of the block whose first row of B is at ``Bb``,
    in the backward's lane mapping, from this lane's states ``h`` before it and its own step's
    ``Δ, Δ x`` (``d, dx``; the other steps' by shuffles), each a tuple over the lane's CPL
    channels: ``h_t[n] = exp(Δ_t A[n]) h_{t-1}[n] + Δ_t x_t B_t[n]``. A row of B is loaded once
    for the CPL channels. Returns, per step, the states after it and its Δ and Δx (tuples over
    the channels; rows past ``rem`` re-read row ``rem``)."""
    hs = ()
    dis = ()
    dxis = ()
    for i in tl.static_range(Q):
        if brows is None:
            braw = _lane_row(Bb, tl.minimum(s0 + i, rem) * bc_stride + nb, lane, S, PACK,
                             VEC, False)
        else:  # (the rows loaded ahead by the caller)
            braw = brows[s0 + i]
        hn = ()
        dn = ()
        dxn = ()
        for c in tl.static_range(CPL):
            di, dxi = _step_delta(d[c], dx[c], base, i, Q, 1, BD)
            new = ()
            for k in tl.static_range(S):
                new = new + (_ex2(di * A2[c][k]) * h[c][k]
                             + dxi * _lane_val(braw, k, PACK, IS_BF16, ACC),)
            hn = hn + (new,)
            dn = dn + (di,)
            dxn = dxn + (dxi,)
        h = hn
        hs = hs + (h,)
        dis = dis + (dn,)
        dxis = dxis + (dxn,)
    return hs, dis, dxis


@triton.jit
def _bwd_fetch(X, DT, DY, Z, cb, last, xd_base, dim, oc, j, HAS_Z: tl.constexpr,
               Q: tl.constexpr, K: tl.constexpr, CPL: tl.constexpr, MASKED: tl.constexpr):
    """The inputs a lane reads for its own steps of the backward's block ``cb`` (``x, dt, dy,
    z`` as stored, per group and channel); ``MASKED``: zeros where the block lies outside the
    segment (a prefetch before the loop, where the segment may be empty)."""
    rem = (last - cb * K).to(tl.int32)
    xo = xd_base + cb * K * dim
    raws = ()
    for gi in tl.static_range(K // Q):
        r = tl.minimum(gi * Q + j, rem)
        ok = r >= 0
        rc = ()
        for c in tl.static_range(CPL):
            off = r * dim + oc[c]
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
            rc = rc + ((x, dt, dy, z),)
        raws = raws + (rc,)
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
                     STATE_DN: tl.constexpr, CPL: tl.constexpr):
    """The saved state entering block ``cb`` (one per block), per channel of the lane."""
    h = ()
    for c in tl.static_range(CPL):
        h = h + (_load_state(STATES + (ck0 + cb) * dim * NST, oc[c], nb, dim, NST, S, ACC,
                             STATE_DN),)
    return h


@triton.jit
def _bwd_quad_block(h, raws, brows, cb, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                    DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                    bc_base, bc_stride, part_base, row0, dim,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, ACC, Q: tl.constexpr, S: tl.constexpr,
                    K: tl.constexpr, PACK: tl.constexpr, VEC: tl.constexpr,
                    IS_BF16: tl.constexpr, BD: tl.constexpr, CPL: tl.constexpr, V: tl.constexpr,
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
    # Recompute the block. Per group and channel: lane j's own step (x, Δ, dy, z,
    # dtraw), and for every step of the block the shared Δ, Δx and the states before /
    # after it (tuples over the lane's channels).
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
        r = tl.minimum(gi * Q + j, rem)
        xg = ()
        dg_ = ()
        dxg_ = ()
        dtg = ()
        dyg = ()
        zg = ()
        vg = ()
        for c in tl.static_range(CPL):
            vld = md[c] & (gi * Q + j <= rem)
            raw = raws[gi][c]  # x, dt, dy, z of lane j's step (fetched by the caller)
            x = raw[0].to(ACC)
            dtraw, d = _delta(raw[1].to(ACC), bias[c], vld, HAS_BIAS, SOFTPLUS)
            dyg = dyg + (tl.where(vld, raw[2].to(ACC), 0.0),)
            if HAS_Z:
                zg = zg + (raw[3].to(ACC),)
            xg = xg + (x,)
            dg_ = dg_ + (d,)
            dxg_ = dxg_ + (d * x,)
            dtg = dtg + (dtraw,)
            vg = vg + (vld,)
        xs = xs + (xg,)
        ds = ds + (dg_,)
        dtraws = dtraws + (dtg,)
        dys = dys + (dyg,)
        zs = zs + (zg,)
        vlds = vlds + (vg,)
        hg, dg, dxg = _quad_group_states(h, dg_, dxg_, Bb, A2, gi * Q, rem, bc_stride, nb,
                                         base, lane, ACC, Q, S, PACK, VEC, IS_BF16, BD,
                                         CPL, brows)
        h = hg[Q - 1]
        hs = hs + hg
        dis = dis + dg
        dxis = dxis + dxg
    # The gate's backward, lane j of each group for its own step: dy·z·σ(z) goes on.
    dygs = ()
    for gi in tl.static_range(NG):
        r = tl.minimum(gi * Q + j, rem)
        if HAS_Z:
            ps = ()
            for i in tl.static_range(Q):
                craw = _lane_row(Cb, tl.minimum(gi * Q + i, rem) * bc_stride + nb, lane,
                                 S, PACK, VEC, False)
                pc = ()
                for c in tl.static_range(CPL):
                    p = tl.zeros([W, 32], dtype=ACC)
                    for k in tl.static_range(S):
                        p += hs[gi * Q + i + 1][c][k] * _lane_val(craw, k, PACK, IS_BF16,
                                                                  ACC)
                    pc = pc + (p,)
                ps = ps + (pc,)
        dyc = ()
        for c in tl.static_range(CPL):
            dyg = dys[gi][c]
            if HAS_Z:
                pcs = ()
                for i in tl.static_range(Q):
                    pcs = pcs + (ps[i][c],)
                y = _quad_sum_scatter(pcs, lane, Q, 1, BD)
                if HAS_D:
                    y += Dv[c] * xs[gi][c]
                z = zs[gi][c]
                sz = _sigmoid(z)
                dz = dyg * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(DZ + xo + (r * dim + oc[c]), dz.to(DZ.dtype.element_ty),
                         mask=vlds[gi][c])
                dyg = dyg * z * sz
            if HAS_D:
                dD_acc = _tuple_add(dD_acc, c, dyg * xs[gi][c])
            dyc = dyc + (dyg,)
        dygs = dygs + (dyc,)
    # The adjoint, backwards through the block.
    for gi in tl.static_range(NG - 1, -1, -1):
        # per step of the group and channel: this lane's Σ_k dh A2 h exp(ΔA), Σ_k dh B
        pa = ()
        pb = ()
        for i in tl.static_range(Q - 1, -1, -1):
            rs = tl.minimum(gi * Q + i, rem)
            if brows is None:
                braw = _lane_row(Bb, rs * bc_stride + nb, lane, S, PACK, VEC, False)
            else:
                braw = brows[gi * Q + i]
            craw = _lane_row(Cb, rs * bc_stride + nb, lane, S, PACK, VEC, False)
            dbs = ()
            dcs = ()
            new_dh = ()
            new_acc = ()
            pac = ()
            pbc = ()
            for c in tl.static_range(CPL):
                if Q == 1:
                    dyi = dygs[gi][c]
                else:
                    dyi = tl.gather(dygs[gi][c], base + i * BD, 1)
                di = dis[gi * Q + i][c]
                dxi = dxis[gi * Q + i][c]
                ddtA = tl.zeros([W, 32], dtype=ACC)
                dhB = tl.zeros([W, 32], dtype=ACC)
                ndh = ()
                nacc = ()
                for k in tl.static_range(S):
                    dhn = dh[c][k] + dyi * _lane_val(craw, k, PACK, IS_BF16, ACC)
                    dhp = dhn * _ex2(di * A2[c][k])  # dh_{t-1}
                    ddA = dhp * hs[gi * Q + i][c][k]  # d/d(ΔA) of exp(ΔA) h_{t-1}, times dh_t
                    ddtA += ddA * A2[c][k]
                    nacc = nacc + (dA_acc[c][k] + ddA * di,)
                    dhB += dhn * _lane_val(braw, k, PACK, IS_BF16, ACC)
                    # dB_t[n] = Σ_d dh_t[d, n] Δ_t[d] x_t[d]; dC_t[n] = Σ_d dy_t[d] h_t[d, n]
                    # (this lane's channels added here)
                    if c == 0:
                        dbs = dbs + (dhn * dxi,)
                        dcs = dcs + (dyi * hs[gi * Q + i + 1][c][k],)
                    else:
                        dbs = _tuple_add(dbs, k, dhn * dxi)
                        dcs = _tuple_add(dcs, k, dyi * hs[gi * Q + i + 1][c][k])
                    ndh = ndh + (dhp,)
                new_dh = new_dh + (ndh,)
                new_acc = new_acc + (nacc,)
                pac = pac + (ddtA,)
                pbc = pbc + (dhB,)
            dh = new_dh
            dA_acc = new_acc
            pa = (pac,) + pa
            pb = (pbc,) + pb
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
        # lane j finishes step gi*Q + j of each channel: dΔ and dx
        r = tl.minimum(gi * Q + j, rem)
        for c in tl.static_range(CPL):
            pa_c = ()
            pb_c = ()
            for i in tl.static_range(Q):
                pa_c = pa_c + (pa[i][c],)
                pb_c = pb_c + (pb[i][c],)
            ddtA = _quad_sum_scatter(pa_c, lane, Q, 1, BD)
            dhB = _quad_sum_scatter(pb_c, lane, Q, 1, BD)
            # A2 = A log2 e, so Σ_n ddA A_n = ln 2 Σ_n ddA A2_n
            ddt = ddtA * LN2 + dhB * xs[gi][c]
            dxo = dhB * ds[gi][c]
            if HAS_D:
                dxo += Dv[c] * dygs[gi][c]
            if SOFTPLUS:
                ddt = tl.where(dtraws[gi][c] > 20.0, ddt, ddt * _sigmoid(dtraws[gi][c]))
            if DBIAS:
                db_acc = _tuple_add(db_acc, c, tl.where(vlds[gi][c], ddt, 0.0))
            off = r * dim + oc[c]
            tl.store(DX + xo + off, dxo.to(DX.dtype.element_ty), mask=vlds[gi][c])
            tl.store(DDT + xo + off, ddt.to(DDT.dtype.element_ty), mask=vlds[gi][c])
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
    STATE_DN: tl.constexpr = 0, CPL: tl.constexpr = 1, BCS_C: tl.constexpr = 0,
    DBIAS: tl.constexpr = 0, A_DN: tl.constexpr = 0,
    PFB: tl.constexpr = 0, XW: tl.constexpr = 0,
):
    """Backward with a channel's N states split over Q lanes, as the split-state forward; the
    lanes backward's algorithm (``triton_kernels.selective_scan_bwd_lanes_kernel``, same
    arguments), with one saved state per block of K steps or, ``M > 1``, per M blocks
    (memory-bounded saving): per group of M blocks, in reverse, the program first runs the
    forward from the saved state over the group and keeps the block-start states in its slice
    of ``SCRATCH`` (``(programs, M, CPL, S, W * 32)``, each lane reading back what it wrote;
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

    ``CPL`` channels per lane (``CPL * 32 / Q`` per warp; lane l of warp w holds channels
    ``(w * CPL + c) * 32 / Q + l % (32 / Q)``): a lane's dB_t, dC_t values are first added over
    its own channels (in the multiply-adds that form them), so the butterfly, the warps' sums,
    the stores of the partial sums and every row of B and C serve CPL times the channels; the
    price is CPL times the registers per lane.

    ``W`` warps per program (``num_warps``), each with its own channels: tensors are
    ``(W, 32)``, lanes along axis 1 (shuffles stay within a warp), and the warps' dB, dC sums
    are added (through shared memory) before they are stored, so the partial sums are per block
    of ``W * CPL * 32 / Q`` channels: by Triton's reduction at every step, or (``XW``, GPU and
    float32 only, where the host has checked the compiled kernel's shared memory) through a
    buffer of the kernel's own, once per block with one barrier (see :func:`_sts`).
    ``DBIAS``: dt_bias's gradient summed here per channel (``DBIAS_PART``, ``(nseq * nseg,
    dim)`` as ``DD_PART``) instead of by a pass over dΔ. ``A_DN``: A read as ``(dim, N)``.
    ``PFB``: each block's saved state and own-step rows (and, 2, its rows of B) loaded a block
    ahead, so that their latency falls on the block before."""
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
    d0 = pid_d * (W * BD * CPL) + (tl.arange(0, W)[:, None] + zw) * (BD * CPL) + ch
    nb = j * S
    seq_state_off = (pid_s.to(tl.int64) * nseg + pid_g) * dim * NST
    # (32,) index vectors for the stores of the warps' dB, dC sums, in the layout of a sum over
    # the warps (reduced once here, so that the loop converts no layouts)
    nb1 = tl.max(j * S, axis=0)
    ch1 = tl.max(ch, axis=0)
    # per channel of the lane: offset (channels contiguous in runs of BD lanes: the hint keeps
    # Triton's stores and loads in the layout of the shuffles, one warp per row, instead of
    # converting through shared memory), mask and parameters
    oc = ()
    md = ()
    A2 = ()
    dh = ()
    Dv = ()
    bias = ()
    dA_acc = ()
    dD_acc = ()
    db_acc = ()
    for c in tl.static_range(CPL):
        offs_d = d0 + c * BD
        if EVEN_D:
            occ = tl.max_contiguous(offs_d, [1, BD])
            mdc = zw == 0
        else:
            occ = tl.max_contiguous(tl.minimum(offs_d, dim - 1), [1, BD])
            mdc = offs_d < dim
        A2c, dhc, Dvc, biasc = _lane_params(A, DHT, D, DT_BIAS, seq_state_off, nb, occ, dim, S,
                                            HAS_DHT, HAS_D, HAS_BIAS, ACC, A_DN)
        oc = oc + (occ,)
        md = md + (mdc,)
        A2 = A2 + (A2c,)
        dh = dh + (dhc,)
        Dv = Dv + (Dvc,)
        bias = bias + (biasc,)
        zs_ = ()
        for _ in tl.static_range(S):
            zs_ = zs_ + (tl.zeros([W, 32], dtype=ACC),)
        dA_acc = dA_acc + (zs_,)
        dD_acc = dD_acc + (tl.zeros([W, 32], dtype=ACC),)
        db_acc = db_acc + (tl.zeros([W, 32], dtype=ACC),)
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
    slot = (SCRATCH + prog * (M * CPL * S * W * 32)
            + (tl.arange(0, W)[:, None] + zw) * 32 + lane)
    if M == 1 and PFB:
        # One saved state per block, and each block's loads issued a block ahead: the saved
        # state and the own-step rows come from DRAM (and, PFB = 2, the rows of B from L2), so
        # their latency falls on the block before.
        cb0 = c_first + nchunks - 1
        # (the segment may be empty: then the first saved state, which always exists, stands
        # in; unmasked, so that the state keeps the layout of the loads in the loop)
        nxt_h = _bwd_fetch_state(STATES, ck0, tl.where(nchunks > 0, cb0, -ck0), oc, nb, dim, S,
                                 NST, ACC, STATE_DN, CPL)
        nxt_r = _bwd_fetch(X, DT, DY, Z, cb0, last, xd_base, dim, oc, j, HAS_Z, Q, K, CPL, True)
        nxt_b = ()
        if PFB > 1:  # the block's rows of B too (an empty segment reads B's first row)
            nxt_b = _bwd_fetch_rows(B, tl.where(nchunks > 0, bc_base + cb0 * K * bc_stride,
                                                g * NST),
                                    tl.where(nchunks > 0, last - cb0 * K, 0), bc_stride, nb,
                                    lane, S, K, PACK, VEC)
        for gg in range(0, nchunks):
            h = nxt_h
            raws = nxt_r
            brows = nxt_b if PFB > 1 else None
            # (the first block's "block before" is itself again: a harmless re-read)
            cn = tl.maximum(cb0 - gg - 1, c_first)
            nxt_h = _bwd_fetch_state(STATES, ck0, cn, oc, nb, dim, S, NST, ACC, STATE_DN, CPL)
            nxt_r = _bwd_fetch(X, DT, DY, Z, cn, last, xd_base, dim, oc, j, HAS_Z, Q, K, CPL,
                               False)
            if PFB > 1:
                nxt_b = _bwd_fetch_rows(B, bc_base + cn * K * bc_stride, last - cn * K,
                                        bc_stride, nb, lane, S, K, PACK, VEC)
            dh, dA_acc, dD_acc, db_acc = _bwd_quad_block(
                h, raws, brows, cb0 - gg, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                bc_base, bc_stride, part_base, row0, dim, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                ACC, Q, S, K, PACK, VEC, IS_BF16, BD, CPL, V, W, DBIAS, XWE)
    else:
        # PFB > 2, memory-bounded saving (M > 1): each group's saved state loaded a group
        # ahead, its first handled block's inputs before the recompute, and the recompute's
        # inputs a block ahead
        CPF: tl.constexpr = M > 1 and PFB > 2
        if CPF:
            nxt_s = ()
            for c in tl.static_range(CPL):  # (an empty segment: the first state, never used)
                nxt_s = nxt_s + (_load_state(
                    STATES + tl.where(ngroups_m > 0, ck0 + t_begin // KM + ngroups_m - 1, 0)
                    * dim * NST, oc[c], nb, dim, NST, S, ACC, STATE_DN),)
        for gg in range(0, ngroups_m):
            gm = ngroups_m - 1 - gg  # group of M blocks, from the last
            cg = c_first + gm * M  # the group's first block
            if M > 1:
                nblk = tl.minimum(nchunks - gm * M, M)  # its blocks inside the segment
                # the group's block-start states, from its saved state (the last one is not
                # advanced past: its block is the first handled below)
                if CPF:
                    h = nxt_s
                    nxt_s = ()
                    for c in tl.static_range(CPL):
                        nxt_s = nxt_s + (_load_state(
                            STATES + (ck0 + t_begin // KM + tl.maximum(gm - 1, 0)) * dim * NST,
                            oc[c], nb, dim, NST, S, ACC, STATE_DN),)
                    # (clamped: a group of one block is the segment's last, maybe partial)
                    nxt_a = _adv_fetch(X, DT, B, cg, xd_base, bc_base, bc_stride, dim, oc, j, nb,
                                       lane, (last - cg * K).to(tl.int32), Q, S, K, CPL, PACK,
                                       VEC, True)
                    nxt_r = _bwd_fetch(X, DT, DY, Z, cg + nblk - 1, last, xd_base, dim, oc, j,
                                       HAS_Z, Q, K, CPL, False)
                    nxt_b = _bwd_fetch_rows(B, bc_base + (cg + nblk - 1) * K * bc_stride,
                                            last - (cg + nblk - 1) * K, bc_stride, nb, lane, S,
                                            K, PACK, VEC)
                else:
                    h = ()
                    for c in tl.static_range(CPL):
                        h = h + (_load_state(STATES + (ck0 + t_begin // KM + gm) * dim * NST,
                                             oc[c], nb, dim, NST, S, ACC, STATE_DN),)
                for m in range(0, nblk - 1):
                    for c in tl.static_range(CPL):
                        for k in tl.static_range(S):
                            tl.store(slot + ((m * CPL + c) * S + k) * (W * 32), h[c][k])
                    if CPF:
                        cur = nxt_a
                        # (the next block to advance past; at the group's last, itself again)
                        nxt_a = _adv_fetch(X, DT, B, tl.minimum(cg + m + 1, cg + nblk - 2),
                                           xd_base, bc_base, bc_stride, dim, oc, j, nb, lane, 0,
                                           Q, S, K, CPL, PACK, VEC, False)
                    else:
                        cur = _adv_fetch(X, DT, B, cg + m, xd_base, bc_base, bc_stride, dim, oc,
                                         j, nb, lane, 0, Q, S, K, CPL, PACK, VEC, False)
                    h = _quad_advance(h, cur, A2, bias, md, nb, j, base, lane, bc_stride,
                                      HAS_BIAS, SOFTPLUS, ACC, Q, S, K, PACK, VEC, IS_BF16, BD,
                                      CPL)
                for c in tl.static_range(CPL):
                    for k in tl.static_range(S):
                        tl.store(slot + (((nblk - 1) * CPL + c) * S + k) * (W * 32), h[c][k])
            else:
                nblk = 1
            # (PFB: within the group, each block's own-step rows and rows of B are loaded a
            # block ahead, as in the loop above; the states come from the L2 scratch)
            if not CPF:
                nxt_r = _bwd_fetch(X, DT, DY, Z, cg + nblk - 1, last, xd_base, dim, oc, j,
                                   HAS_Z, Q, K, CPL, False)
                nxt_b = ()
                if PFB > 1:
                    nxt_b = _bwd_fetch_rows(B, bc_base + (cg + nblk - 1) * K * bc_stride,
                                            last - (cg + nblk - 1) * K, bc_stride, nb, lane, S,
                                            K, PACK, VEC)
            for mm in range(0, nblk):
                cb = cg + nblk - 1 - mm
                if M > 1:
                    hb = ()
                    for c in tl.static_range(CPL):
                        hc = ()
                        for k in tl.static_range(S):
                            hc = hc + (tl.load(slot + (((nblk - 1 - mm) * CPL + c) * S + k)
                                               * (W * 32)),)
                        hb = hb + (hc,)
                else:
                    hb = _bwd_fetch_state(STATES, ck0, cb, oc, nb, dim, S, NST, ACC, STATE_DN,
                                          CPL)
                if PFB:
                    raws = nxt_r
                    brows = nxt_b if PFB > 1 else None
                    cn = tl.maximum(cb - 1, cg)
                    nxt_r = _bwd_fetch(X, DT, DY, Z, cn, last, xd_base, dim, oc, j, HAS_Z, Q, K,
                                       CPL, False)
                    if PFB > 1:
                        nxt_b = _bwd_fetch_rows(B, bc_base + cn * K * bc_stride, last - cn * K,
                                                bc_stride, nb, lane, S, K, PACK, VEC)
                else:
                    raws = _bwd_fetch(X, DT, DY, Z, cb, last, xd_base, dim, oc, j, HAS_Z, Q, K,
                                      CPL, False)
                    brows = None
                dh, dA_acc, dD_acc, db_acc = _bwd_quad_block(
                    hb, raws, brows, cb, dh, dA_acc, dD_acc, db_acc, B, C, DX, DDT, DZ, DB_PART,
                    DC_PART, A2, Dv, bias, oc, md, nb, nb1, ch1, j, base, lane, last, xd_base,
                    bc_base, bc_stride, part_base, row0, dim, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                    ACC, Q, S, K, PACK, VEC, IS_BF16, BD, CPL, V, W, DBIAS, XWE)
    po = (pid_s.to(tl.int64) * nseg + pid_g) * dim
    for c in tl.static_range(CPL):
        for k in tl.static_range(S):
            tl.store(DH0 + seq_state_off + (nb + k) * dim + oc[c],
                     dh[c][k].to(DH0.dtype.element_ty), mask=md[c])
            tl.store(DA_PART + seq_state_off + (nb + k) * dim + oc[c],
                     dA_acc[c][k].to(DA_PART.dtype.element_ty), mask=md[c])
        if HAS_D:
            tot = _quad_allsum(dD_acc[c], lane, Q, 1, BD)
            tl.store(DD_PART + po + oc[c], tot.to(DD_PART.dtype.element_ty),
                     mask=md[c] & (j == 0))
        if DBIAS:
            tot = _quad_allsum(db_acc[c], lane, Q, 1, BD)
            tl.store(DBIAS_PART + po + oc[c], tot.to(DBIAS_PART.dtype.element_ty),
                     mask=md[c] & (j == 0))


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


@triton.jit
def _tuple_add(t, i: tl.constexpr, v):
    """The tuple ``t`` with ``v`` added to element ``i``."""
    out = ()
    for n in tl.static_range(len(t)):
        if n == i:
            out = out + (t[n] + v,)
        else:
            out = out + (t[n],)
    return out
