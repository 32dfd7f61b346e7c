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

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _softplus(v):
    # softplus(v) = log(1 + e^v); linear above 20 (as the reference kernel), e^v below -15 where
    # log(1 + e^v) = e^v to float precision and 1 + e^v would round.
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def _load_group(X, DT, Z, B, C, row0, t0, seqlen, dim, dstate, ngroups, g, offs_d, offs_n,
                HAS_Z: tl.constexpr, G: tl.constexpr):
    """Inputs of steps t0 .. t0+G-1 (zeros past the sequence end), as tuples of G tensors, in
    their storage dtype (a bf16 vector of N values takes N/2 registers until converted)."""
    xs = ()
    dts = ()
    zs = ()
    bs = ()
    cs = ()
    for i in tl.static_range(G):
        t = t0 + i
        valid = t < seqlen
        row = row0 + t
        md = offs_d < tl.where(valid, dim, 0)
        mn = offs_n < tl.where(valid, dstate, 0)
        xd_off = row * dim + offs_d
        bc_off = (row * ngroups + g) * dstate + offs_n
        xs = xs + (tl.load(X + xd_off, mask=md, other=0.0),)
        dts = dts + (tl.load(DT + xd_off, mask=md, other=0.0),)
        if HAS_Z:
            zs = zs + (tl.load(Z + xd_off, mask=md, other=0.0),)
        else:
            zs = zs + (xs[i],)
        bs = bs + (tl.load(B + bc_off, mask=mn, other=0.0),)
        cs = cs + (tl.load(C + bc_off, mask=mn, other=0.0),)
    return xs, dts, zs, bs, cs


@triton.jit
def selective_scan_fwd_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, H0, Y, HT, STATES, CU, CHUNK_OFF,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
):
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    if IS_VARLEN:
        row0 = tl.load(CU + pid_s).to(tl.int64)
        seqlen = tl.load(CU + pid_s + 1).to(tl.int64) - row0
        ck0 = tl.load(CHUNK_OFF + pid_s).to(tl.int64)
    else:
        row0 = pid_s.to(tl.int64) * L
        seqlen = row0 * 0 + L
        ck0 = pid_s.to(tl.int64) * nchunks_per_seq
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
    if HAS_D:
        Dv = tl.load(D + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(DT_BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)
    seq_state_off = pid_s.to(tl.int64) * dim * dstate
    if HAS_H0:
        h = tl.load(H0 + seq_state_off + dn_off, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    nchunks = tl.cdiv(seqlen, K)
    for c in range(0, nchunks):
        t0 = c * K
        # Loads are issued a group of G steps ahead of the compute that uses them. The stores of
        # y may alias the inputs as far as the compiler knows, so it cannot hoist a later load
        # above them: without this, every step waits one full memory latency.
        cur = _load_group(X, DT, Z, B, C, row0, t0, seqlen, dim, dstate, ngroups, g, offs_d,
                          offs_n, HAS_Z, G)
        if SAVE_STATES:
            tl.store(STATES + (ck0 + c) * dim * dstate + dn_off, h.to(STATES.dtype.element_ty),
                     mask=mask_dn)
        for j in tl.static_range(K // G):
            if j + 1 < K // G:
                nxt = _load_group(X, DT, Z, B, C, row0, t0 + (j + 1) * G, seqlen, dim, dstate,
                                  ngroups, g, offs_d, offs_n, HAS_Z, G)
            xs, dts, zs, bs, cs = cur
            for i in tl.static_range(G):
                t = t0 + j * G + i
                valid = t < seqlen
                # (one compare per vector, not `mask & valid`, which the CPU interpreter mis-types)
                md = offs_d < tl.where(valid, dim, 0)
                x = xs[i].to(ACC)
                dt = dts[i].to(ACC)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                dt = tl.where(md, dt, 0.0)  # padding steps: Δ = 0 leaves h untouched
                # exp(Δ A) = exp2((Δ log2 e) · A): one multiply per channel, not per state
                dA = tl.exp2((dt * LOG2E)[None, :] * Av)
                h = dA * h + (dt * x)[None, :] * bs[i].to(ACC)[:, None]
                y = tl.sum(h * cs[i].to(ACC)[:, None], axis=0)
                if HAS_D:
                    y += Dv * x
                if HAS_Z:
                    z = zs[i].to(ACC)
                    y = y * z * tl.sigmoid(z)
                tl.store(Y + (row0 + t) * dim + offs_d, y.to(Y.dtype.element_ty), mask=md)
            if j + 1 < K // G:
                cur = nxt
    if STORE_HT:
        tl.store(HT + seq_state_off + dn_off, h.to(HT.dtype.element_ty), mask=mask_dn)


@triton.jit
def selective_scan_bwd_kernel(
    X, DT, A, B, C, D, Z, DT_BIAS, STATES, CU, CHUNK_OFF, DY, DHT,
    DX, DDT, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DH0,
    L, dim, dstate, ngroups, blocks_per_group, nchunks_per_seq, total_rows,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_F64: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, KEEP_DECAY: tl.constexpr,
):
    ACC = tl.float64 if USE_F64 else tl.float32
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    if IS_VARLEN:
        row0 = tl.load(CU + pid_s).to(tl.int64)
        seqlen = tl.load(CU + pid_s + 1).to(tl.int64) - row0
        ck0 = tl.load(CHUNK_OFF + pid_s).to(tl.int64)
    else:
        row0 = pid_s.to(tl.int64) * L
        seqlen = row0 * 0 + L
        ck0 = pid_s.to(tl.int64) * nchunks_per_seq
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
    if HAS_D:
        Dv = tl.load(D + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(DT_BIAS + offs_d, mask=mask_d, other=0.0).to(ACC)
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
        das = ()
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
            if HAS_BIAS:
                dtraw = dtraw + bias
            if SOFTPLUS:
                dt = _softplus(dtraw)
            else:
                dt = dtraw
            dt = tl.where(md, dt, 0.0)
            dA = tl.exp2((dt * LOG2E)[None, :] * Av)
            h = dA * h + (dt * x)[None, :] * Bt[:, None]
            hs = hs + (h,)
            if KEEP_DECAY:
                das = das + (dA,)
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
            if KEEP_DECAY:
                dA = das[i]
            else:  # recompute: fewer registers, one more exponential
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
                sz = tl.sigmoid(z)
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
                ddt = tl.where(dtraws[i] > 20.0, ddt, ddt * tl.sigmoid(dtraws[i]))
            tl.store(DX + xd_off, dx.to(DX.dtype.element_ty), mask=md)
            tl.store(DDT + xd_off, ddt.to(DDT.dtype.element_ty), mask=md)
            dh = dh * dA
    tl.store(DH0 + seq_state_off + dn_off, dh.to(DH0.dtype.element_ty), mask=mask_dn)
    tl.store(DA_PART + seq_state_off + dn_off, dA_acc.to(DA_PART.dtype.element_ty), mask=mask_dn)
    if HAS_D:
        tl.store(DD_PART + pid_s.to(tl.int64) * dim + offs_d, dD_acc.to(DD_PART.dtype.element_ty),
                 mask=mask_d)
