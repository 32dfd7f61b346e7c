"""Triton kernels of the delta rule (imported on first use; see :mod:`ssmkit.ops.delta_rule.triton`).

Chunked forward (``_dr_fwd``) and backward (``_dr_bwd``): one program owns one (sequence, value
head, block of V) and walks its chunks of ``BT`` tokens, the state ``h (K, BV)`` in registers
(float32, float64 for float64 inputs). Per chunk, with the prefix sums ``c`` of the log decays
(zero for the plain rule), ``Γ[t, i] = exp(c_t - c_i)`` (i <= t), ``γ = exp(c)``:

* ``A = strict_lower(diag(β) (Γ ∘ K Kᵀ))``, ``T = (I + A)⁻¹`` by forward substitution (the UT
  transform; it reads only K, β and g, so every V block computes the same T; with a backward to
  come the first V block stores it for the backward, which does not recompute it);
* ``W = T diag(βγ) K``, ``U = T diag(β) V - W h``;
* ``O = diag(γ) Q h + (Γ ∘ Q Kᵀ) U``, ``h <- γ_C h + (diag(γ_C / γ) K)ᵀ U``.

Every product is a ``tl.dot`` of float32 operands (TF32 tensor cores for half-precision inputs,
IEEE float32 for float32; float64 for float64). q and k are
L2-normalised in the kernel (``L2NORM``) and q scaled. Value head ``hv`` reads query/key head
``hv // (Hv // H)``. The forward stores the state entering every chunk (``S``) when a backward
follows. The backward is two passes: ``_dr_bwd_dh`` walks the chunks in reverse with the state's
adjoint ``dh (K, BV)`` and stores it at every chunk boundary; ``_dr_bwd_chunk`` then runs all
chunks in parallel from the stored states and adjoints, writing dv and per-V-block partial sums
of dq̂, dk̂, dβ, dg (summed, and reduced over each query/key head's value heads, outside:
deterministic). ``_dr_step`` is the fused recurrent decode step.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, MM_DT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with operands cast to ``MM_DT``, accumulated in float32 (float64 for float64)."""
    return tl.dot(a.to(MM_DT), b.to(MM_DT), input_precision=PREC)


@triton.jit
def _mmx(a, b, MM_DT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """``a @ b`` for computed float32 operands (T, W, U, the states and their adjoints): with
    ``SPLIT`` each operand is a sum of two half-precision parts, x = hi + lo, and the product is
    hi·hi + hi·lo + lo·hi (three tensor-core matmuls, about 16 mantissa bits instead of 8);
    otherwise :func:`_mm`."""
    if SPLIT:
        a_hi = a.to(MM_DT)
        b_hi = b.to(MM_DT)
        a_lo = (a - a_hi.to(tl.float32)).to(MM_DT)
        b_lo = (b - b_hi.to(tl.float32)).to(MM_DT)
        return tl.dot(a_hi, b_hi) + tl.dot(a_hi, b_lo) + tl.dot(a_lo, b_hi)
    return tl.dot(a.to(MM_DT), b.to(MM_DT), input_precision=PREC)


@triton.jit
def _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN: tl.constexpr):
    """(first token in the flattened (batch * seqlen) rows, length, first chunk in the state
    scratch) of sequence ``seq``."""
    if VARLEN:
        start = tl.load(cu_ptr + seq).to(tl.int64)
        length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
        chunk0 = tl.load(choff_ptr + seq).to(tl.int64)
    else:
        start = seq.to(tl.int64) * seqlen
        length = start * 0 + seqlen
        chunk0 = seq.to(tl.int64) * nchunks_max
    return start, length, chunk0


@triton.jit
def _load_qk(ptr, base, t, t_mask, offs_k, k_mask, stride_t, L2NORM: tl.constexpr, CDT: tl.constexpr):
    """Rows ``t`` of q or k ``(BT, BK)``, L2-normalised with ``L2NORM`` (x / sqrt(|x|² + 1e-6))."""
    x = tl.load(ptr + base + t[:, None] * stride_t + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                other=0.0).to(CDT)
    if L2NORM:
        x = x / tl.sqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    return x


@triton.jit
def _unit_lower_inverse(A, scratch_ptr, BT: tl.constexpr, CDT: tl.constexpr):
    """``(I + A)⁻¹`` of a strictly lower-triangular ``A (BT, BT)`` by forward substitution, built
    by columns of its transpose: with S = T - I, ``Sᵀ[:, i] = -A[i]ᵀ - Sᵀ A[i]ᵀ`` (columns left
    of i are final). Row i of A is read back from ``scratch_ptr`` (this program's ``BT²``
    scratch) instead of being cut out of the register tile, so every step reduces along the
    tile's second axis (within a warp) and no step needs a block-wide reduction."""
    offs = tl.arange(0, BT)
    tl.store(scratch_ptr + offs[:, None] * BT + offs[None, :], A)
    tl.debug_barrier()
    St = tl.zeros((BT, BT), dtype=CDT)
    for i in range(1, BT):
        a_j = tl.load(scratch_ptr + i * BT + offs)  # A[i, j], along the columns of Sᵀ
        a_r = tl.load(scratch_ptr + i * BT + offs)  # A[i, r], along its rows
        col = -a_r - tl.sum(St * a_j[None, :], 1)
        St = tl.where(offs[None, :] == i, col[:, None], St)
    tl.debug_barrier()  # (the scratch is rewritten by the next chunk)
    return tl.trans(St) + tl.where(offs[:, None] == offs[None, :], 1.0, 0.0).to(CDT)


@triton.jit
def _chunk_factors(g_ptr, bg_base, t, t_mask, bg_st, kb, bt, GATED: tl.constexpr, PREC: tl.constexpr,
                   CDT: tl.constexpr, MM_DT: tl.constexpr, BT: tl.constexpr):
    """Per chunk: Γ (zero above the diagonal) from the prefix sums c of g, γ, γ_C / γ, γ_C,
    K Kᵀ and A = strict_lower(diag(β) (Γ ∘ K Kᵀ))."""
    offs = tl.arange(0, BT)
    if GATED:
        g = tl.load(g_ptr + bg_base + t * bg_st, mask=t_mask, other=0.0).to(CDT)
    else:
        g = tl.zeros((BT,), dtype=CDT)
    c = tl.cumsum(g, 0)
    c_last = tl.sum(tl.where(offs == BT - 1, c, 0.0), 0)
    lower = offs[:, None] >= offs[None, :]
    Gam = tl.exp(tl.where(lower, c[:, None] - c[None, :], float("-inf")))
    gam = tl.exp(c)
    gam_end = tl.exp(c_last - c)
    decay = tl.exp(c_last)
    kk = _mm(kb, tl.trans(kb), MM_DT, PREC).to(CDT)
    A = tl.where(offs[:, None] > offs[None, :], bt[:, None] * kk * Gam, 0.0)
    return Gam, gam, gam_end, decay, kk, A


@triton.jit
def _load_T(T_ptr, chunk, Hv, hv, BT: tl.constexpr):
    """The UT inverse of ``chunk`` stored by the forward: ``T_ptr[chunk, hv] (BT, BT)``."""
    offs = tl.arange(0, BT)
    return tl.load(T_ptr + (chunk * Hv + hv) * BT * BT + offs[:, None] * BT + offs[None, :])


@triton.jit
def _tile(start, hk, hv, pid_v, H, Hv, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A program's offsets and masks (tokens of a chunk, K, its block of V), the bases of its
    q/k head ``hk``, value head ``hv`` and β/g rows from ``start``, and the offsets and mask of a
    ``(K, BV)`` state block."""
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_mask = offs_k < K
    v_mask = offs_v < V
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    state_mask = k_mask[:, None] & v_mask[None, :]
    return (offs_t, offs_k, offs_v, k_mask, v_mask, start * H * K + hk * K, start * Hv * V + hv * V,
            start * Hv + hv, state_offs, state_mask)


@triton.jit
def _dr_fwd(
    q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, h0_ptr, cu_ptr, choff_ptr, o_ptr, hT_ptr, S_ptr, T_ptr, scratch_ptr,
    seqlen, H, Hv, K, V, nchunks_max, scale,
    GATED: tl.constexpr, L2NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_S: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, CDT: tl.constexpr, MM_DT: tl.constexpr,
    SPLIT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_v = tl.program_id(1)
    seq = pid // Hv
    hv = pid % Hv
    hk = hv // (Hv // H)
    start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    offs_t, offs_k, offs_v, k_mask, v_mask, qk_base, v_base, bg_base, state_offs, state_mask = _tile(
        start, hk, hv, pid_v, H, Hv, K, V, BT, BK, BV)
    sidx = (seq * Hv + hv).to(tl.int64) * K * V
    scratch = scratch_ptr + (pid.to(tl.int64) * tl.num_programs(1) + pid_v) * BT * BT
    offs_tt = offs_t[:, None] * BT + offs_t[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + sidx + state_offs, mask=state_mask, other=0.0).to(CDT)
    else:
        h = tl.zeros((BK, BV), dtype=CDT)
    for ci in range(0, tl.cdiv(length, BT)):
        t = (ci * BT + offs_t).to(tl.int64)
        t_mask = t < length
        tv_mask = t_mask[:, None] & v_mask[None, :]
        if STORE_S:
            tl.store(S_ptr + ((chunk0 + ci) * Hv + hv) * K * V + state_offs, h, mask=state_mask)
        kb = _load_qk(k_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT)
        qb = _load_qk(q_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT) * scale
        vb = tl.load(v_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :], mask=tv_mask, other=0.0).to(CDT)
        bt = tl.load(beta_ptr + bg_base + t * Hv, mask=t_mask, other=0.0).to(CDT)
        Gam, gam, gam_end, decay, kk, A = _chunk_factors(g_ptr, bg_base, t, t_mask, Hv, kb, bt, GATED, PREC,
                                                         CDT, MM_DT, BT)
        T = _unit_lower_inverse(A, scratch, BT, CDT)
        if STORE_S:
            if pid_v == 0:
                tl.store(T_ptr + ((chunk0 + ci) * Hv + hv) * BT * BT + offs_tt, T)
        W = _mmx(T, (bt * gam)[:, None] * kb, MM_DT, PREC, SPLIT).to(CDT)
        U = _mmx(T, bt[:, None] * vb, MM_DT, PREC, SPLIT).to(CDT) - _mmx(W, h, MM_DT, PREC, SPLIT).to(CDT)
        P = _mm(qb, tl.trans(kb), MM_DT, PREC).to(CDT) * Gam
        o = gam[:, None] * _mmx(qb, h, MM_DT, PREC, SPLIT).to(CDT) + _mmx(P, U, MM_DT, PREC, SPLIT).to(CDT)
        tl.store(o_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=tv_mask)
        h = decay * h + _mmx(tl.trans(gam_end[:, None] * kb), U, MM_DT, PREC, SPLIT).to(CDT)
    if STORE_HT:
        tl.store(hT_ptr + sidx + state_offs, h, mask=state_mask)


@triton.jit
def _dr_bwd_dh(
    q_ptr, k_ptr, beta_ptr, g_ptr, cu_ptr, choff_ptr, T_ptr, do_ptr, dhT_ptr, dS_ptr, dh0_ptr,
    seqlen, H, Hv, K, V, nchunks_max, scale,
    GATED: tl.constexpr, L2NORM: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, CDT: tl.constexpr, MM_DT: tl.constexpr,
    SPLIT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """The state's adjoint, chunks in reverse: ``dS[chunk]`` = the gradient reaching the state
    that leaves each chunk, and ``dh0``. Per chunk, dU = Pᵀ dO + diag(γ_C/γ) K dh and
    dh <- γ_C dh + (diag(γ) Q)ᵀ dO - Wᵀ dU (the forward's h_C and O read h only there)."""
    pid = tl.program_id(0)
    pid_v = tl.program_id(1)
    seq = pid // Hv
    hv = pid % Hv
    hk = hv // (Hv // H)
    start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    offs_t, offs_k, offs_v, k_mask, v_mask, qk_base, v_base, bg_base, state_offs, state_mask = _tile(
        start, hk, hv, pid_v, H, Hv, K, V, BT, BK, BV)
    sidx = (seq * Hv + hv).to(tl.int64) * K * V
    if HAS_DHT:
        dh = tl.load(dhT_ptr + sidx + state_offs, mask=state_mask, other=0.0).to(CDT)
    else:
        dh = tl.zeros((BK, BV), dtype=CDT)
    nch = tl.cdiv(length, BT)
    for i in range(0, nch):
        ci = nch - 1 - i
        tl.store(dS_ptr + ((chunk0 + ci) * Hv + hv) * K * V + state_offs, dh, mask=state_mask)
        t = (ci * BT + offs_t).to(tl.int64)
        t_mask = t < length
        kb = _load_qk(k_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT)
        qb = _load_qk(q_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT) * scale
        bt = tl.load(beta_ptr + bg_base + t * Hv, mask=t_mask, other=0.0).to(CDT)
        do = tl.load(do_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :],
                     mask=t_mask[:, None] & v_mask[None, :], other=0.0).to(CDT)
        Gam, gam, gam_end, decay, kk, A = _chunk_factors(g_ptr, bg_base, t, t_mask, Hv, kb, bt, GATED, PREC,
                                                         CDT, MM_DT, BT)
        T = _load_T(T_ptr, chunk0 + ci, Hv, hv, BT)
        W = _mmx(T, (bt * gam)[:, None] * kb, MM_DT, PREC, SPLIT).to(CDT)
        P = _mm(qb, tl.trans(kb), MM_DT, PREC).to(CDT) * Gam
        dU = _mmx(tl.trans(P), do, MM_DT, PREC, SPLIT).to(CDT) + gam_end[:, None] * _mmx(kb, dh, MM_DT, PREC, SPLIT).to(CDT)
        dh = decay * dh + _mmx(tl.trans(gam[:, None] * qb), do, MM_DT, PREC, SPLIT).to(CDT) \
            - _mmx(tl.trans(W), dU, MM_DT, PREC, SPLIT).to(CDT)
    if HAS_H0:
        tl.store(dh0_ptr + sidx + state_offs, dh, mask=state_mask)


@triton.jit
def _dr_bwd_chunk(
    q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, cu_ptr, choff_ptr, cseq_ptr, S_ptr, T_ptr, dS_ptr, do_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
    seqlen, ntok, nseq, H, Hv, K, V, nchunks_max, scale,
    GATED: tl.constexpr, L2NORM: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, CDT: tl.constexpr,
    MM_DT: tl.constexpr, SPLIT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """One chunk of one value head and V block, all chunks in parallel: from the state entering
    the chunk (``S``) and the adjoint of the state leaving it (``dS``), dv (exact) and this V
    block's partial dq̂ (the gradient of the normalised, scaled q), dk̂, dβ and dg
    (``(NV, tokens, Hv, ...)``)."""
    j = tl.program_id(0)  # the chunk in the state scratch
    hv = tl.program_id(1)
    pid_v = tl.program_id(2)
    hk = hv // (Hv // H)
    if VARLEN:
        seq = tl.load(cseq_ptr + j)
        seq_c = tl.minimum(seq, nseq - 1)  # rows past the last chunk: masked out below
        start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq_c, seqlen, nchunks_max, VARLEN)
        ci = j - chunk0
        length = tl.where(seq < nseq, length, 0)
    else:
        seq = j // nchunks_max
        ci = j % nchunks_max
        start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    offs_t, offs_k, offs_v, k_mask, v_mask, qk_base, v_base, bg_base, state_offs, state_mask = _tile(
        start, hk, hv, pid_v, H, Hv, K, V, BT, BK, BV)
    part_qk = pid_v.to(tl.int64) * ntok * Hv * K + start * Hv * K + hv * K
    part_bg = pid_v.to(tl.int64) * ntok * Hv + bg_base
    lower = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    t = (ci * BT + offs_t).to(tl.int64)
    t_mask = t < length
    tv_mask = t_mask[:, None] & v_mask[None, :]
    tk_mask = t_mask[:, None] & k_mask[None, :]
    sk = (j.to(tl.int64) * Hv + hv) * K * V
    h0 = tl.load(S_ptr + sk + state_offs, mask=state_mask, other=0.0).to(CDT)
    dh = tl.load(dS_ptr + sk + state_offs, mask=state_mask, other=0.0).to(CDT)
    kb = _load_qk(k_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT)
    qb = _load_qk(q_ptr, qk_base, t, t_mask, offs_k, k_mask, H * K, L2NORM, CDT) * scale
    vb = tl.load(v_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :], mask=tv_mask, other=0.0).to(CDT)
    bt = tl.load(beta_ptr + bg_base + t * Hv, mask=t_mask, other=0.0).to(CDT)
    do = tl.load(do_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :], mask=tv_mask, other=0.0).to(CDT)
    Gam, gam, gam_end, decay, kk, A = _chunk_factors(g_ptr, bg_base, t, t_mask, Hv, kb, bt, GATED, PREC,
                                                     CDT, MM_DT, BT)
    T = _load_T(T_ptr, j.to(tl.int64), Hv, hv, BT)
    bgk = (bt * gam)[:, None] * kb
    bv = bt[:, None] * vb
    W = _mmx(T, bgk, MM_DT, PREC, SPLIT).to(CDT)
    U = _mmx(T, bv, MM_DT, PREC, SPLIT).to(CDT) - _mmx(W, h0, MM_DT, PREC, SPLIT).to(CDT)
    qk = _mm(qb, tl.trans(kb), MM_DT, PREC).to(CDT)
    P = qk * Gam
    # O = diag(γ) Q h0 + P U and h_C = γ_C h0 + (diag(γ_C/γ) K)ᵀ U
    dU = _mmx(tl.trans(P), do, MM_DT, PREC, SPLIT).to(CDT) + gam_end[:, None] * _mmx(kb, dh, MM_DT, PREC, SPLIT).to(CDT)
    dP = tl.where(lower, _mmx(do, tl.trans(U), MM_DT, PREC, SPLIT).to(CDT), 0.0)
    doh = _mmx(do, tl.trans(h0), MM_DT, PREC, SPLIT).to(CDT)  # dO h0ᵀ: (BT, BK)
    udh = _mmx(U, tl.trans(dh), MM_DT, PREC, SPLIT).to(CDT)  # U dhᵀ: (BT, BK)
    dPG = dP * Gam
    dq = gam[:, None] * doh + _mmx(dPG, kb, MM_DT, PREC, SPLIT).to(CDT)
    dk = _mmx(tl.trans(dPG), qb, MM_DT, PREC, SPLIT).to(CDT) + gam_end[:, None] * udh
    dGam = dP * qk
    dc = gam * tl.sum(doh * qb, 1) - gam_end * tl.sum(udh * kb, 1)
    dc_last = tl.sum(gam_end * tl.sum(udh * kb, 1), 0) + decay * tl.sum(tl.sum(dh * h0, 1), 0)
    # U = T (βV) - T (βγK) h0
    dW = -_mmx(dU, tl.trans(h0), MM_DT, PREC, SPLIT).to(CDT)
    dT = _mmx(dU, tl.trans(bv), MM_DT, PREC, SPLIT).to(CDT) + _mmx(dW, tl.trans(bgk), MM_DT, PREC, SPLIT).to(CDT)
    TT = tl.trans(T)
    dbv = _mmx(TT, dU, MM_DT, PREC, SPLIT).to(CDT)
    dbgk = _mmx(TT, dW, MM_DT, PREC, SPLIT).to(CDT)
    dbgk_k = tl.sum(dbgk * kb, 1)
    dbeta = tl.sum(dbv * vb, 1) + gam * dbgk_k
    dc += bt * gam * dbgk_k
    dk += (bt * gam)[:, None] * dbgk
    # T = (I + A)⁻¹: dA = -Tᵀ dT Tᵀ (strictly lower); A = diag(β) (Γ ∘ K Kᵀ)
    dA = tl.where(strict, -_mmx(_mmx(TT, dT, MM_DT, PREC, SPLIT).to(CDT), TT, MM_DT, PREC, SPLIT).to(CDT), 0.0)
    dbeta += tl.sum(dA * Gam * kk, 1)
    dkk = dA * bt[:, None] * Gam
    dk += _mmx(dkk, kb, MM_DT, PREC, SPLIT).to(CDT) + _mmx(tl.trans(dkk), kb, MM_DT, PREC, SPLIT).to(CDT)
    dGam += dA * bt[:, None] * kk
    tl.store(dq_ptr + part_qk + t[:, None] * (Hv * K) + offs_k[None, :], dq, mask=tk_mask)
    tl.store(dk_ptr + part_qk + t[:, None] * (Hv * K) + offs_k[None, :], dk, mask=tk_mask)
    tl.store(dv_ptr + v_base + t[:, None] * (Hv * V) + offs_v[None, :], (bt[:, None] * dbv).to(dv_ptr.dtype.element_ty),
             mask=tv_mask)
    tl.store(dbeta_ptr + part_bg + t * Hv, dbeta, mask=t_mask)
    if GATED:
        # Γ[t, i] = exp(c_t - c_i), γ = exp(c), γ_C = exp(c_last); g = differences of c
        dGG = tl.where(lower, dGam * Gam, 0.0)
        dc += tl.sum(dGG, 1) - tl.sum(dGG, 0)
        dc += tl.where(offs_t == BT - 1, dc_last, 0.0)
        tl.store(dg_ptr + part_bg + t * Hv, tl.cumsum(dc, 0, reverse=True), mask=t_mask)


@triton.jit
def _dr_step(
    state_ptr, idx_ptr, q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, o_ptr,
    T, H, Hv, K, V, scale,
    GATED: tl.constexpr, L2NORM: tl.constexpr, HAS_IDX: tl.constexpr, CDT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """Decoding: T tokens of one (batch row, value head, V block) through the recurrence, the
    state read once from ``state[state_batch_indices[b]]`` and written back once."""
    pid = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = (pid // Hv).to(tl.int64)
    hv = pid % Hv
    hk = hv // (Hv // H)
    slot = tl.load(idx_ptr + b).to(tl.int64) if HAS_IDX else b
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_mask = offs_k < K
    v_mask = offs_v < V
    state_offs = (slot * Hv + hv) * K * V + offs_k[:, None] * V + offs_v[None, :]
    state_mask = k_mask[:, None] & v_mask[None, :]
    h = tl.load(state_ptr + state_offs, mask=state_mask, other=0.0).to(CDT)
    for t in range(0, T):
        tok = b * T + t
        qk_off = (tok * H + hk) * K + offs_k
        qv = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(CDT)
        kv = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(CDT)
        if L2NORM:
            qv = qv / tl.sqrt(tl.sum(qv * qv, 0) + 1e-6)
            kv = kv / tl.sqrt(tl.sum(kv * kv, 0) + 1e-6)
        qv = qv * scale
        vv = tl.load(v_ptr + (tok * Hv + hv) * V + offs_v, mask=v_mask, other=0.0).to(CDT)
        bt = tl.load(beta_ptr + tok * Hv + hv).to(CDT)
        if GATED:
            h = h * tl.exp(tl.load(g_ptr + tok * Hv + hv).to(CDT))
        u = bt * (vv - tl.sum(kv[:, None] * h, 0))
        h = h + kv[:, None] * u[None, :]
        o = tl.sum(qv[:, None] * h, 0)
        tl.store(o_ptr + (tok * Hv + hv) * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_mask)
    tl.store(state_ptr + state_offs, h.to(state_ptr.dtype.element_ty), mask=state_mask)
