"""Triton kernels of the selective scan (Mamba's S6), forward and backward.

Imported only through :mod:`ssmkit.ops.selective_scan.triton` when Triton is installed.

Math (Gu & Dao 2023, Algorithm 2; ZOH for A, Euler B̄ = Δ·B as in the reference kernel), per batch
row / packed sequence, channel d and state index n::

    Δ_t        = softplus(dt_t + dt_bias)                (or dt_t + dt_bias without softplus)
    h_t[d, n]  = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[g(d), n] x_t[d]
    y_t[d]     = (Σ_n C_t[g(d), n] h_t[d, n] + D[d] x_t[d]) · silu(z_t[d])

One program owns one sequence and ``BLOCK_D`` channels of one group and walks the sequence in
blocks of ``K`` tokens, unrolled (``tl.static_range``). Tiles are ``(N, BLOCK_D)``: channels
across lanes, a channel's N states in one thread, so ``C·h`` stays in registers; the state ``h``
(float32) never leaves the chip. Inputs are loaded in groups of ``G`` steps, one group ahead of
their use: the compiler cannot move a load above an earlier store of ``y`` (they may alias), so
without the explicit grouping each step would wait a full memory latency. With ``SAVE_STATES`` the
state at the start of every block of ``K`` tokens is written out (``batch * ceil(L/K) * N * dim``
floats) for the backward pass.

The backward walks the blocks in reverse: it reloads a block's start state, recomputes the ``K``
states of the block in registers (tuples; dy and z are read in this store-free pass), then runs
the adjoint recurrence ``dh_{t-1} = exp(Δ_t A) dh_t`` (with ``dh_t += C_t dy_t``) backwards
through it, reading ``B_t, C_t`` one step ahead. Reductions over channels (dB, dC) are written per
channel block and summed by the caller; the reductions over time (dA, dD) are kept per sequence.
No atomics: results are bitwise reproducible. A, the states and their gradients use an
``(N, dim)``-major layout so that their tiles load and store coalesced.

All offsets are computed in int64, so tensors with more than 2**31 elements index correctly.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Inline PTX only when compiling for a GPU (Triton's CPU interpreter cannot run it).
FAST_LOG = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _ex2(v):
    """2**v through ex2.approx.ftz.f32 (MUFU.EX2 alone; plain ex2.approx.f32 makes ptxas wrap it
    in a subnormal range fix: FSETP + 2 predicated FMUL)."""
    if FAST_LOG and v.dtype == tl.float32:
        out = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        out = tl.exp2(v)
    return out


@triton.jit
def _rcp(v):
    """1/v through rcp.approx.ftz.f32 (one MUFU.RCP; div.full.f32 adds a range fix)."""
    if FAST_LOG and v.dtype == tl.float32:
        out = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        out = 1.0 / v
    return out


@triton.jit
def _sigmoid(v):
    # 1 / (1 + 2^(-v log2 e)): MUFU.EX2 + MUFU.RCP, against about 11 instructions for
    # tl.sigmoid (its exp and div.full both get a range fix-up)
    return _rcp(1.0 + _ex2(v * -LOG2E))


@triton.jit
def _log(v):
    """Natural log. On the GPU in float32 through the special-function unit (``lg2.approx``, about
    2**-22 relative error, 2 instructions): Triton's ``tl.log`` is a ~25-instruction polynomial,
    a noticeable share of a scan step. The interpreter (no inline assembly) and float64 keep
    ``tl.log``."""
    if FAST_LOG and v.dtype == tl.float32:
        out = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [v],
                                        dtype=tl.float32, is_pure=True, pack=1) * LN2
    else:
        out = tl.log(v)
    return out


@triton.jit
def _softplus(v):
    # softplus(v) = log(1 + e^v); linear above 20 (as the reference kernel), e^v below -15 where
    # log(1 + e^v) = e^v to float precision and 1 + e^v would round.
    e = _ex2(v * LOG2E)
    return tl.where(v > 20.0, v, tl.where(v < -15.0, e, _log(1.0 + e)))


@triton.jit
def _delta(dt, bias, md, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(dt + dt_bias, Δ)`` with ``Δ = softplus(dt + dt_bias)`` (or without softplus), zero where
    ``md`` is false: padding steps and channels past ``dim`` then leave the state untouched
    (``exp(0·A) = 1``, ``0·B x = 0``)."""
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        d = _softplus(dt)
    else:
        d = dt
    return dt, tl.where(md, d, 0.0)


@triton.jit
def _vec(P, off, mask_d, EVEN_D: tl.constexpr):
    """A vector of channels at ``P + off``; unmasked when the channel blocks tile ``dim``."""
    if EVEN_D:
        v = tl.load(P + off)
    else:
        v = tl.load(P + off, mask=mask_d, other=0.0)
    return v


@triton.jit
def _sequence(CU, CHUNK_OFF, pid_s, L, nchunks_per_seq, IS_VARLEN: tl.constexpr):
    """First row, length and first saved-state block (int64) of the program's sequence: a batch
    row, or a packed sequence of ``cu_seqlens``."""
    if IS_VARLEN:
        row0 = tl.load(CU + pid_s).to(tl.int64)
        seqlen = tl.load(CU + pid_s + 1).to(tl.int64) - row0
        ck0 = tl.load(CHUNK_OFF + pid_s).to(tl.int64)
    else:
        row0 = pid_s.to(tl.int64) * L
        seqlen = row0 * 0 + L
        ck0 = pid_s.to(tl.int64) * nchunks_per_seq
    return row0, seqlen, ck0


@triton.jit
def _segment_rows(CU, CHUNK_OFF, pid_s, pid_g, pid_d, L, nchunks_per_seq, seg_len,
                  blocks_per_group, dim, dstate, z_rs, b_rs, c_rs, IS_VARLEN: tl.constexpr):
    """Where a forward program's rows are (int64): ``(t_begin, t_end, ck0, xd_base, z_base,
    b_base, c_base)`` for segment ``pid_g`` of sequence ``pid_s`` and the group of channel block
    ``pid_d``. Row offsets are per sequence, so a step's address is one multiply-add; z, B and C
    may be views with their own row strides (slices of a projection's output)."""
    row0, seqlen, ck0 = _sequence(CU, CHUNK_OFF, pid_s, L, nchunks_per_seq, IS_VARLEN)
    t_begin = pid_g.to(tl.int64) * seg_len
    t_end = tl.minimum(t_begin + seg_len, seqlen)
    g = pid_d // blocks_per_group
    return (t_begin, t_end, ck0, row0 * dim, row0 * z_rs, row0 * b_rs + g * dstate,
            row0 * c_rs + g * dstate)


@triton.jit
def _channel_params(D, DT_BIAS, offs_d, mask_d, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACC: tl.constexpr):
    """D and dt_bias of the program's channels (zeros where absent)."""
    if HAS_D:
        Dv = tl.load(D + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        Dv = tl.zeros(offs_d.shape, dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(DT_BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros(offs_d.shape, dtype=ACC)
    return Dv, bias


@triton.jit
def _load_group_rel(Xc, DTc, Zc, Bc, Cc, j0, rem, dim, z_rs, b_rs, c_rs, offs_d, offs_n,
                    mask_d, mask_n, HAS_Z: tl.constexpr, EVEN_D: tl.constexpr,
                    EVEN_N: tl.constexpr, G: tl.constexpr, CLAMP: tl.constexpr = True,
                    PACK: tl.constexpr = 1):
    """The inputs of G steps from ``j0`` on, from per-block base pointers (Xc = X + (row0 + t0)
    * dim, ...) and int32 step offsets: the clamp (``CLAMP``: steps past ``rem = last - t0``
    reread step ``rem``) is one int32 min of a constant and ``rem``, the address one int32
    multiply and a 64-bit add per pointer (not an int64 clamp-multiply-shift chain)."""
    xs = ()
    dts = ()
    zs = ()
    bs = ()
    cs = ()
    for i in tl.static_range(G):
        if CLAMP:
            ti = tl.minimum(rem, j0 + i)
        else:
            ti = j0 + i
        xo = ti * dim
        xs = xs + (_vec(Xc + xo, offs_d, mask_d, EVEN_D),)
        dts = dts + (_vec(DTc + xo, offs_d, mask_d, EVEN_D),)
        if HAS_Z:
            zs = zs + (_vec(Zc + ti * z_rs, offs_d, mask_d, EVEN_D),)
        if not HAS_Z:
            zs = zs + (xs[i],)
        if PACK == 2:
            # two bf16 per 32-bit word (offs_n here is arange(0, BLOCK_N // 2))
            bs = bs + (tl.load((Bc + ti * b_rs).to(tl.pointer_type(tl.int32)) + offs_n),)
            cs = cs + (tl.load((Cc + ti * c_rs).to(tl.pointer_type(tl.int32)) + offs_n),)
        elif EVEN_N:
            bs = bs + (tl.load(Bc + ti * b_rs + offs_n),)
            cs = cs + (tl.load(Cc + ti * c_rs + offs_n),)
        else:
            bs = bs + (tl.load(Bc + ti * b_rs + offs_n, mask=mask_n, other=0.0),)
            cs = cs + (tl.load(Cc + ti * c_rs + offs_n, mask=mask_n, other=0.0),)
    return xs, dts, zs, bs, cs


@triton.jit
def _row_f32(r, PACK: tl.constexpr, ACC: tl.constexpr):
    """A row of B or C as ACC. PACK == 2: int32 words of two bfloat16 (element 2k in the low
    half; only bfloat16 rows are passed packed), one shift or one AND per value (Triton's
    bf16->f32 of an unpacked pair is PRMT + SHF)."""
    if PACK == 2:
        lo = (r << 16).to(tl.float32, bitcast=True)
        hi = (r & -65536).to(tl.float32, bitcast=True)
        out = tl.reshape(tl.join(lo, hi), [2 * r.shape[0]])
    else:
        out = r.to(ACC)
    return out


@triton.jit
def selective_scan_fwd_tile_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, H0, Y, HT, STATES, CU, CHUNK_OFF, DSUM,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq, z_rs, b_rs, c_rs, seg_len, nseg,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, STORE_Y: tl.constexpr, STORE_DSUM: tl.constexpr,
    PACK: tl.constexpr = 1, KS: tl.constexpr = 0,
):
    """The tile forward: one program scans one sequence (or segment) for BLOCK_D channels, with
    (a) tiles (BLOCK_D, BLOCK_N) and a contiguity hint of 1 on their offsets so that Triton keeps
    its default layout, one channel per lane with its BLOCK_N states in the thread (no shuffles,
    no shared-memory layout conversions), (b) per-block base pointers and int32 step offsets,
    (c) ftz exp/lg2/rcp for softplus and silu; inputs loaded in groups of G steps, one group ahead.

    ``KS`` (a divisor or a multiple of K; 0 = K): spacing of the saved states. The backward runs
    fastest on blocks of 4 steps, the forward on 8 (a group of loads in flight while the other
    computes), so the forward unrolls K steps and saves the state every KS of them; a KS beyond K
    (memory-bounded saving, the backward recomputing the states between) needs segments that are
    multiples of KS."""
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    t_begin, t_end, ck0, xd_base, z_base, b_base, c_base = _segment_rows(
        CU, CHUNK_OFF, pid_s, pid_g, pid_d, L, nchunks_per_seq, seg_len, blocks_per_group, dim,
        dstate, z_rs, b_rs, c_rs, IS_VARLEN)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    # (BLOCK_D, BLOCK_N) tiles of the (N, dim)-major A and states. Contiguity 1: otherwise Triton
    # vectorises these loads along d and lays the whole scan out 4 channels x 4 states per thread.
    dn_off = tl.max_contiguous(offs_d[:, None] + offs_n[None, :].to(tl.int64) * dim, [1, 1])
    Av = tl.load(A + dn_off, mask=mask_dn, other=0.0).to(ACC) * LOG2E
    Dv, bias = _channel_params(D, DT_BIAS, offs_d, mask_d, HAS_D, HAS_BIAS, ACC)
    seq_state_off = (pid_s.to(tl.int64) * nseg + pid_g) * dim * dstate
    if HAS_H0:
        h = tl.load(H0 + seq_state_off + dn_off, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    last = t_end - 1
    dsum = tl.zeros([BLOCK_D], dtype=ACC)
    nchunks = tl.cdiv(t_end - t_begin, K)
    KSV: tl.constexpr = K if KS == 0 else KS
    ck0 = ck0 + t_begin // KSV
    if PACK == 2:
        offs_w = tl.arange(0, BLOCK_N // 2)
    else:
        offs_w = offs_n
    # Full chunks first, without clamping or validity tests (constant step offsets j * dim),
    # then at most one partial chunk with them.
    nfull = (t_end - t_begin) // K
    for c in range(0, nfull):
        h, dsum = _fwd2_chunk(h, dsum, c, t_begin, last, xd_base, z_base, b_base, c_base,
                                   ck0, X, DT, Z, B, C, Y, STATES, Av, Dv, bias, dim, dstate,
                                   z_rs, b_rs, c_rs, offs_d, offs_w, mask_d, mask_n, dn_off,
                                   mask_dn, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                   SAVE_STATES, ACC, K, G, EVEN_D, EVEN_N, STORE_Y, STORE_DSUM,
                                   PACK, False, KSV)
    for c in range(nfull, nchunks):
        h, dsum = _fwd2_chunk(h, dsum, c, t_begin, last, xd_base, z_base, b_base, c_base,
                                   ck0, X, DT, Z, B, C, Y, STATES, Av, Dv, bias, dim, dstate,
                                   z_rs, b_rs, c_rs, offs_d, offs_w, mask_d, mask_n, dn_off,
                                   mask_dn, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                   SAVE_STATES, ACC, K, G, EVEN_D, EVEN_N, STORE_Y, STORE_DSUM,
                                   PACK, True, KSV)
    if STORE_HT:
        tl.store(HT + seq_state_off + dn_off, h.to(HT.dtype.element_ty), mask=mask_dn)
    if STORE_DSUM:
        tl.store(DSUM + (pid_s.to(tl.int64) * nseg + pid_g) * dim + offs_d,
                 dsum.to(DSUM.dtype.element_ty), mask=mask_d)


@triton.jit
def _block_ptrs(X, DT, Y, Z, B, C, t0, last, xd_base, z_base, b_base, c_base, dim, z_rs, b_rs,
                c_rs, HAS_Z: tl.constexpr):
    """``(rem, X, DT, Y, Z, B, C)`` at the block starting at step ``t0`` of a forward program's
    rows: a step of the block is then an int32 offset from these; ``rem = last - t0`` (int32),
    steps ``<= rem`` are in the segment (z falls back to x without a gate)."""
    rem = (last - t0).to(tl.int32)
    xo0 = xd_base + t0 * dim
    Xc = X + xo0
    if HAS_Z:
        Zc = Z + (z_base + t0 * z_rs)
    else:
        Zc = Xc
    return (rem, Xc, DT + xo0, Y + xo0, Zc, B + (b_base + t0 * b_rs),
            C + (c_base + t0 * c_rs))


@triton.jit
def _fwd2_chunk(h, dsum, c, t_begin, last, xd_base, z_base, b_base, c_base, ck0,
                X, DT, Z, B, C, Y, STATES, Av, Dv, bias, dim, dstate, z_rs, b_rs, c_rs,
                offs_d, offs_w, mask_d, mask_n, dn_off, mask_dn,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, ACC: tl.constexpr,
                K: tl.constexpr, G: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
                STORE_Y: tl.constexpr, STORE_DSUM: tl.constexpr,
                PACK: tl.constexpr, CLAMP: tl.constexpr, KS: tl.constexpr):
    """One block of K steps of the tile forward (``CLAMP``: the segment may end inside it)."""
    rem, Xc, DTc, Yc, Zc, Bc, Cc = _block_ptrs(X, DT, Y, Z, B, C, t_begin + c * K, last,
                                               xd_base, z_base, b_base, c_base, dim, z_rs,
                                               b_rs, c_rs, HAS_Z)
    grp = _load_group_rel(Xc, DTc, Zc, Bc, Cc, 0, rem, dim, z_rs, b_rs, c_rs, offs_d,
                          offs_w, mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N, G, CLAMP, PACK)
    for j in tl.static_range(K // G):
        if j + 1 < K // G:
            nxt = _load_group_rel(Xc, DTc, Zc, Bc, Cc, (j + 1) * G, rem, dim, z_rs, b_rs,
                                  c_rs, offs_d, offs_w, mask_d, mask_n, HAS_Z, EVEN_D,
                                  EVEN_N, G, CLAMP, PACK)
        xs, dts, zs, bs, cs = grp
        for i in tl.static_range(G):
            jt = j * G + i
            if SAVE_STATES and KS > K and jt == 0:
                # one state every KS // K chunks (the backward recomputes the ones between)
                sp = STATES + (ck0 + c // (KS // K)) * dim * dstate + dn_off
                tl.store(sp, h.to(STATES.dtype.element_ty), mask=mask_dn
                         & (offs_d[:, None] < tl.where(c % (KS // K) == 0, dim, 0)))
            elif SAVE_STATES and jt % KS == 0:
                # the state entering steps jt .. jt+KS-1, for the backward
                sp = STATES + (ck0 + c * (K // KS) + jt // KS) * dim * dstate + dn_off
                if CLAMP:  # blocks that start past the segment end do not exist
                    tl.store(sp, h.to(STATES.dtype.element_ty), mask=mask_dn
                             & (offs_d[:, None] < tl.where(rem >= jt, dim, 0)))
                else:
                    tl.store(sp, h.to(STATES.dtype.element_ty), mask=mask_dn)
            x = xs[i].to(ACC)
            if CLAMP:
                md = offs_d < tl.where(jt <= rem, dim, 0)
            else:
                md = mask_d
            _, dt = _delta(dts[i].to(ACC), bias, md, HAS_BIAS, SOFTPLUS)
            dA = _ex2(dt[:, None] * Av)
            h = dA * h + (dt * x)[:, None] * _row_f32(bs[i], PACK, ACC)[None, :]
            if STORE_DSUM:
                dsum += dt
            if STORE_Y:
                y = tl.sum(h * _row_f32(cs[i], PACK, ACC)[None, :], axis=1)
                if HAS_D:
                    y += Dv * x
                if HAS_Z:
                    z = zs[i].to(ACC)
                    y = y * z * _sigmoid(z)
                if CLAMP or not EVEN_D:
                    tl.store(Yc + jt * dim + offs_d, y.to(Y.dtype.element_ty), mask=md)
                else:
                    tl.store(Yc + jt * dim + offs_d, y.to(Y.dtype.element_ty))
        if j + 1 < K // G:
            grp = nxt
    return h, dsum


@triton.jit
def _row_raw(P, off, N: tl.constexpr, PACK: tl.constexpr):
    """``P[off : off + N]`` (one row of B or C) as a tuple of scalars, loaded by every lane of the
    program (the same address: one L1 broadcast). 16-bit types are loaded two per 32-bit word
    (``PACK == 2``) and stay packed until :func:`_row_val`, so a prefetched row costs N/2
    registers."""
    vals = ()
    if PACK == 2:
        P32 = (P + off).to(tl.pointer_type(tl.int32))
        for k in tl.static_range(N // 2):
            vals = vals + (tl.load(P32 + k),)
    else:
        for k in tl.static_range(N):
            vals = vals + (tl.load(P + off + k),)
    return vals


@triton.jit
def _row_val(raw, n: tl.constexpr, PACK: tl.constexpr, IS_BF16: tl.constexpr, ACC: tl.constexpr):
    """Element ``n`` of a row from :func:`_row_raw`, as ``ACC`` (little-endian: element 2k is the
    low half of word k)."""
    if PACK == 2:
        v = raw[n // 2]
        if IS_BF16:  # a bfloat16 is the high half of a float32
            if n % 2 == 0:
                out = (v << 16).to(tl.float32, bitcast=True)
            else:
                out = (v & -65536).to(tl.float32, bitcast=True)
        else:
            if n % 2 == 0:
                bits = (v & 65535).to(tl.int16)
            else:
                bits = ((v >> 16) & 65535).to(tl.int16)
            out = bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        out = raw[n].to(ACC)
    return out


@triton.jit
def selective_scan_bwd_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, STATES, CU, CHUNK_OFF, DY, DHT,
    DX, DDT, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DH0,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq, total_rows,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
):
    """The tile backward: the general fallback (any N, any group split), one program per
    sequence and BLOCK_D channels, a state saved every K steps (see the module docstring)."""
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row0, seqlen, ck0 = _sequence(CU, CHUNK_OFF, pid_s, L, nchunks_per_seq, IS_VARLEN)
    g = pid_d // blocks_per_group
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    # Tiles are (BLOCK_N, BLOCK_D): channels across lanes, the N states of a channel in one thread,
    # so sums over n stay in registers.
    mask_dn = mask_n[:, None] & mask_d[None, :]
    # A, the states and their gradients are stored transposed, (N, dim) per sequence, so that
    # these tiles are contiguous along the channels and load coalesced in this layout.
    dn_off = offs_n[:, None].to(tl.int64) * dim + offs_d[None, :]
    Av = tl.load(A + dn_off, mask=mask_dn, other=0.0).to(ACC)
    Dv, bias = _channel_params(D, DT_BIAS, offs_d, mask_d, HAS_D, HAS_BIAS, ACC)
    seq_state_off = pid_s.to(tl.int64) * dim * dstate
    if HAS_DHT:
        dh = tl.load(DHT + seq_state_off + dn_off, mask=mask_dn, other=0.0).to(ACC)
    else:
        dh = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dD_acc = tl.zeros([BLOCK_D], dtype=ACC)
    part_base = pid_d.to(tl.int64) * total_rows
    nchunks = tl.cdiv(seqlen, K)
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        t0 = c * K
        h = tl.load(STATES + (ck0 + c) * dim * dstate + dn_off, mask=mask_dn, other=0.0).to(ACC)
        # Recompute the block in registers: hs[i] is the state before step i, hs[K] after the
        # last step; das[i] the decay exp(Δ_i A).
        hs = (h,)
        xs = ()
        dts = ()
        dtraws = ()
        dys = ()
        zs = ()
        for i in tl.static_range(K):
            t = t0 + i
            valid = t < seqlen
            row = row0 + t
            # (one compare per vector, not `mask & valid`, which the CPU interpreter mis-types)
            md = offs_d < tl.where(valid, dim, 0)
            mn = offs_n < tl.where(valid, dstate, 0)
            xd_off = row * dim + offs_d
            x = tl.load(X + xd_off, mask=md, other=0.0).to(ACC)
            dtraw = tl.load(DT + xd_off, mask=md, other=0.0).to(ACC)
            bc_off = (row * ngroups + g) * dstate + offs_n
            Bt = tl.load(B + bc_off, mask=mn, other=0.0).to(ACC)
            Ct = tl.load(C + bc_off, mask=mn, other=0.0).to(ACC)
            dtraw, dt = _delta(dtraw, bias, md, HAS_BIAS, SOFTPLUS)
            dA = tl.exp2((dt * LOG2E)[None, :] * Av)
            h = dA * h + (dt * x)[None, :] * Bt[:, None]
            hs = hs + (h,)
            xs = xs + (x,)
            dts = dts + (dt,)
            dtraws = dtraws + (dtraw,)
            # dy and z are read here, in the store-free pass, so the loads issue together
            # (a load after a store that may alias it cannot be moved up by the compiler).
            dys = dys + (tl.load(DY + xd_off, mask=md, other=0.0),)
            if HAS_Z:
                zs = zs + (tl.load(Z + xd_off, mask=md, other=0.0),)
        # B_t, C_t are re-read in the reverse pass (cache hits) rather than kept (N registers
        # each per step), one step ahead of their use so the load is not behind the stores.
        bc_off = (row0 + t0 + K - 1) * ngroups * dstate + g * dstate + offs_n
        mn = offs_n < tl.where(t0 + K - 1 < seqlen, dstate, 0)
        Bn = tl.load(B + bc_off, mask=mn, other=0.0)
        Cn = tl.load(C + bc_off, mask=mn, other=0.0)
        for i in tl.static_range(K - 1, -1, -1):
            t = t0 + i
            valid = t < seqlen
            row = row0 + t
            # (one compare per vector, not `mask & valid`, which the CPU interpreter mis-types)
            md = offs_d < tl.where(valid, dim, 0)
            mn = offs_n < tl.where(valid, dstate, 0)
            xd_off = row * dim + offs_d
            x = xs[i]
            dt = dts[i]
            # recomputed rather than kept from the first pass: fewer registers
            dA = tl.exp2((dt * LOG2E)[None, :] * Av)
            Bt = Bn.to(ACC)
            Ct = Cn.to(ACC)
            if i > 0:
                bc_off = ((row - 1) * ngroups + g) * dstate + offs_n
                mnp = offs_n < tl.where(t - 1 < seqlen, dstate, 0)
                Bn = tl.load(B + bc_off, mask=mnp, other=0.0)
                Cn = tl.load(C + bc_off, mask=mnp, other=0.0)
            dy = dys[i].to(ACC)
            if HAS_Z:
                z = zs[i].to(ACC)
                y = tl.sum(hs[i + 1] * Ct[:, None], axis=0)
                if HAS_D:
                    y += Dv * x
                sz = _sigmoid(z)
                dz = dy * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(DZ + xd_off, dz.to(DZ.dtype.element_ty), mask=md)
                dy = dy * z * sz
            if HAS_D:
                dD_acc += dy * x
            dh += dy[None, :] * Ct[:, None]
            # dC_t[n] = Σ_d dy_t[d] h_t[d, n]; dB_t[n] = Σ_d dh_t[d, n] Δ_t[d] x_t[d]
            dC = tl.sum(dy[None, :] * hs[i + 1], axis=1)
            dtx = dt * x
            dB = tl.sum(dh * dtx[None, :], axis=1)
            part_off = (part_base + row) * dstate + offs_n
            tl.store(DC_PART + part_off, dC.to(DC_PART.dtype.element_ty), mask=mn)
            tl.store(DB_PART + part_off, dB.to(DB_PART.dtype.element_ty), mask=mn)
            # d/dΔ of exp(ΔA) h + Δ B x, and d/dA (summed over time into dA_acc)
            ddA = dh * hs[i] * dA
            dhB = tl.sum(dh * Bt[:, None], axis=0)
            ddt = tl.sum(ddA * Av, axis=0) + dhB * x
            dA_acc += ddA * dt[None, :]
            dx = dhB * dt
            if HAS_D:
                dx += Dv * dy
            if SOFTPLUS:
                ddt = tl.where(dtraws[i] > 20.0, ddt, ddt * _sigmoid(dtraws[i]))
            tl.store(DX + xd_off, dx.to(DX.dtype.element_ty), mask=md)
            tl.store(DDT + xd_off, ddt.to(DDT.dtype.element_ty), mask=md)
            dh = dh * dA
    tl.store(DH0 + seq_state_off + dn_off, dh.to(DH0.dtype.element_ty), mask=mask_dn)
    tl.store(DA_PART + seq_state_off + dn_off, dA_acc.to(DA_PART.dtype.element_ty), mask=mask_dn)
    if HAS_D:
        tl.store(DD_PART + pid_s.to(tl.int64) * dim + offs_d, dD_acc.to(DD_PART.dtype.element_ty),
                 mask=mask_d)



@triton.jit
def _scatter_level(vals, lane, HALF: tl.constexpr, MASK: tl.constexpr, AX: tl.constexpr = 0):
    """One butterfly level: keep one half of the values, send the other to lane ^ MASK, add
    (``AX``: the axis of the tensors that runs over a warp's lanes)."""
    upper = (lane & MASK) != 0
    new = ()
    for i in tl.static_range(HALF):
        a = vals[i]
        b = vals[i + HALF]
        send = tl.where(upper, a, b)
        keep = tl.where(upper, b, a)
        new = new + (keep + tl.gather(send, lane ^ MASK, AX),)
    return new


@triton.jit
def sum_partials_kernel(PART, OUT, nparts, numel, width, ngroups, USE_F64: tl.constexpr,
                        BLOCK: tl.constexpr):
    """The backward's per-channel-block partial sums of dB, dC added up:
    ``OUT[r, g, n] = Σ_p PART[g * nparts + p, r, n]``, converted to OUT's dtype on the way.

    ``PART``: ``(ngroups * nparts, rows, width)`` float32/64 (blocks of channels of group g are
    g * nparts .. g * nparts + nparts - 1), ``numel = rows * width``; ``OUT``: ``(rows,
    ngroups, width)``. One program per
    group and BLOCK consecutive (row, n) entries, the parts added in order (deterministic); one
    read of the partial sums and the output written once, where ``sum`` then ``.to`` read the
    partials, wrote a float32 sum and converted it (H100: 0.13 ms of a 2.0 ms training step)."""
    ACC = tl.float64 if USE_F64 else tl.float32
    g = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    src = PART + g.to(tl.int64) * nparts * numel + offs
    acc = tl.zeros([BLOCK], dtype=ACC)
    for _ in range(0, nparts):  # (the pointer moves on: p * numel may not fit 32 bits)
        acc += tl.load(src, mask=mask, other=0.0).to(ACC)
        src += numel
    dst = OUT + ((offs // width) * ngroups + g) * width + offs % width
    tl.store(dst, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def chain_segments_kernel(HLOC, DSUM, A, H0, STARTS, dim, dstate, nseg,
                          HAS_H0: tl.constexpr, USE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of the sequence-parallel forward: the start state of every segment,
    ``start_0 = h0``, ``start_s = exp(A ΣΔ_{s-1}) start_{s-1} + hloc_{s-1}``.

    ``HLOC, STARTS``: ``(nseq, nseg, N, dim)``; ``DSUM``: ``(nseq, nseg, dim)``; ``A``: ``(N, dim)``;
    ``H0``: ``(nseq, N, dim)``. One program per sequence and block of ``BLOCK`` (n, d) entries."""
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nd = dim * dstate
    mask = offs < nd
    d = offs % dim
    a2 = tl.load(A + offs, mask=mask, other=0.0).to(ACC) * LOG2E
    base = pid_s.to(tl.int64) * nseg
    if HAS_H0:
        h = tl.load(H0 + pid_s.to(tl.int64) * nd + offs, mask=mask, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK], dtype=ACC)
    for s in range(0, nseg):
        tl.store(STARTS + (base + s) * nd + offs, h.to(STARTS.dtype.element_ty), mask=mask)
        ds = tl.load(DSUM + (base + s) * dim + d, mask=mask, other=0.0).to(ACC)
        hl = tl.load(HLOC + (base + s) * nd + offs, mask=mask, other=0.0).to(ACC)
        h = tl.exp2(a2 * ds) * h + hl


@triton.jit
def adjoint_local_kernel(
    DT, A, C, Z, DT_BIAS, DY, DHLOC, DSUM,
    L, dim, dstate, ngroups, blocks_per_group, seg_len, nseg,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, USE_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, N: tl.constexpr, K: tl.constexpr, EVEN_D: tl.constexpr,
    PACK: tl.constexpr, IS_BF16: tl.constexpr,
):
    """Pass 1 of the sequence-parallel backward: the adjoint of every segment run from a zero
    state at its end, ``dh_{t-1} = exp(Δ_t A) (dh_t + C_t dy'_t)`` (dy' the gated output
    gradient), down to the segment's start, and ΣΔ over the segment. The adjoint is linear in dh
    and needs no forward states, so this pass reads dt, dy, z and C only. Outputs
    ``DHLOC (nseq * nseg, N, dim)``, ``DSUM (nseq * nseg, dim)``. One lane per channel."""
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    row0 = pid_s.to(tl.int64) * L
    t_begin = pid_g.to(tl.int64) * seg_len
    t_end = tl.minimum(t_begin + seg_len, L)
    g = pid_d // blocks_per_group
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    A2 = ()
    dh = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A + n * dim + offs_d, mask=mask_d, other=0.0).to(ACC) * LOG2E,)
        dh = dh + (tl.zeros([BLOCK_D], dtype=ACC),)
    if HAS_BIAS:
        bias = tl.load(DT_BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = None
    dsum = tl.zeros([BLOCK_D], dtype=ACC)
    xd_base = row0 * dim
    bc_stride = ngroups * dstate
    bc_base = row0 * bc_stride + g * dstate
    nchunks = tl.cdiv(t_end - t_begin, K)
    for cc in range(0, nchunks):
        t0 = t_begin + (nchunks - 1 - cc) * K
        # The block's inputs first (no stores in this loop, so nothing holds the loads back).
        dts = ()
        dys = ()
        zs = ()
        crs = ()
        for i in tl.static_range(K):
            tc = tl.minimum(t0 + i, t_end - 1)
            off = xd_base + tc * dim + offs_d
            dts = dts + (_vec(DT, off, mask_d, EVEN_D),)
            dys = dys + (_vec(DY, off, mask_d, EVEN_D),)
            if HAS_Z:
                zs = zs + (_vec(Z, off, mask_d, EVEN_D),)
            crs = crs + (_row_raw(C, bc_base + tc * bc_stride, N, PACK),)
        for i in tl.static_range(K - 1, -1, -1):
            md = offs_d < tl.where(t0 + i < t_end, dim, 0)
            _, dt = _delta(dts[i].to(ACC), bias, md, HAS_BIAS, SOFTPLUS)
            dy = tl.where(md, dys[i].to(ACC), 0.0)
            if HAS_Z:
                z = zs[i].to(ACC)
                dy = dy * z * _sigmoid(z)
            dsum += dt
            new = ()
            for n in tl.static_range(N):
                new = new + (tl.exp2(dt * A2[n])
                             * (dh[n] + dy * _row_val(crs[i], n, PACK, IS_BF16, ACC)),)
            dh = new
    out = (pid_s.to(tl.int64) * nseg + pid_g) * dim
    for n in tl.static_range(N):
        tl.store(DHLOC + out * dstate + n * dim + offs_d, dh[n].to(DHLOC.dtype.element_ty),
                 mask=mask_d)
    tl.store(DSUM + out + offs_d, dsum.to(DSUM.dtype.element_ty), mask=mask_d)
