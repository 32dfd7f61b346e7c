"""Triton kernels of the fused-chunk SSD (imported on first use; see :mod:`ssmkit.ops.ssd.triton`).

One program owns one (sequence, head, block of P) and walks its chunks of ``BLOCK_Q`` tokens in
order, the state ``h (P, N)`` in float32 registers. Per chunk, with the log decays
``a_t = Δ_t A`` and their within-chunk prefix sums ``c_i``:

* ``y = (L ∘ C Bᵀ)(Δx) + exp(c) ∘ (C hᵀ) + D x``, ``L_ij = exp(c_i - c_j)`` for i >= j: the
  diagonal block and the state's contribution, two matmuls on the tensor cores;
* ``h <- exp(c_Q) h + (exp(c_Q - c) ∘ Δx)ᵀ B``: the chunk's state, a third matmul.

Nothing but ``y`` (and the final state) leaves the chip: no chunk states, no ``C Bᵀ`` blocks in
memory. The split forward (``_ssd_states_fwd`` then ``_ssd_fwd_chunk``) stores the state entering
each chunk in one light walk over the chunks (one matmul a chunk, a block of the state's rows
per program), then computes every chunk's output at once. The backward walks the chunks twice,
storing the state entering each chunk (``_ssd_states_fwd``) and the state's adjoint leaving it
(``_ssd_dstates_bwd``: ``dh <- exp(c_Q) dh + (exp(c) ∘ dy)ᵀ C``), then computes every chunk's
gradients at once (``_ssd_bwd``), and sums the B and C gradients over the heads of each group
(``_ssd_bwd_dbc``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dt_process(dt_ptr, bias, t_idx, t_mask, stride_dt_t, DT_SOFTPLUS: tl.constexpr, dt_min, dt_max,
                CDT: tl.constexpr):
    """Δ for the rows ``t_idx``: clamp(softplus?(dt + dt_bias)); 0 on masked rows. Also returns
    the derivative dΔ/d(dt) (softplus' and the clamp's)."""
    raw = tl.load(dt_ptr + t_idx * stride_dt_t, mask=t_mask, other=0.0).to(CDT) + bias
    if DT_SOFTPLUS:
        sp = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))))
        deriv = tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    else:
        sp = raw
        deriv = tl.full(raw.shape, 1.0, CDT)
    inside = (sp >= dt_min) & (sp <= dt_max)
    dlt = tl.minimum(tl.maximum(sp, dt_min), dt_max)
    dlt = tl.where(t_mask, dlt, 0.0)
    deriv = tl.where(t_mask & inside, deriv, 0.0)
    return dlt, deriv


@triton.jit
def _chunk_decays(dt_ptr, bias, A, t_idx, t_mask, stride_dt_t, DT_SOFTPLUS: tl.constexpr, dt_min, dt_max,
                  CDT: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Δ and dΔ/d(dt) of a chunk's rows (:func:`_dt_process`), the prefix sums ``c`` of its log
    decays ΔA and their total ``c_Q``."""
    dlt, deriv = _dt_process(dt_ptr, bias, t_idx, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max, CDT)
    cum = tl.cumsum(dlt * A, axis=0)
    c_last = tl.sum(tl.where(tl.arange(0, BLOCK_Q) == BLOCK_Q - 1, cum, 0.0), axis=0)
    return dlt, deriv, cum, c_last


@triton.jit
def _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN: tl.constexpr):
    """(batch row, first token, length, first chunk in the state scratch) of sequence ``seq``:
    row ``seq`` of the batch, or with packed sequences rows ``cu[seq]:cu[seq + 1]`` of row 0."""
    if VARLEN:
        start = tl.load(cu_ptr + seq).to(tl.int64)
        length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
        chunk0 = tl.load(choff_ptr + seq).to(tl.int64)
        row = seq.to(tl.int64) * 0
    else:
        start = seq.to(tl.int64) * 0
        length = seqlen + start
        chunk0 = seq.to(tl.int64) * nchunks_max
        row = seq.to(tl.int64)
    return row, start, length, chunk0


@triton.jit
def _chunk_program(cu_ptr, choff_ptr, seqlen, H, heads_per_group, nchunks_max, VARLEN: tl.constexpr):
    """(program id, sequence, head, group, chunk, and :func:`_bounds`' batch row, first token,
    length and first chunk) of a program of a one-dimensional grid of ``sequences · H ·
    nchunks_max``: no 65,535 limit on the chunks, as a grid's second axis would have."""
    pid = tl.program_id(0)
    k = pid % nchunks_max
    seq = pid // (H * nchunks_max)
    head = (pid // nchunks_max) % H
    row, start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    return pid, seq, head, head // heads_per_group, k, row, start, length, chunk0


@triton.jit
def _head_params(A_ptr, bias_ptr, D_ptr, head, P, offs_p, p_mask, HAS_BIAS: tl.constexpr,
                 HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, CDT: tl.constexpr):
    """A, dt_bias (0 without it) and D (per head, or ``(BLOCK_P,)`` per channel; 0 without it)
    of ``head``."""
    A = tl.load(A_ptr + head).to(CDT)
    bias = tl.load(bias_ptr + head).to(CDT) if HAS_BIAS else 0.0
    Dv = 0.0
    if HAS_D:
        if D_PER_CHANNEL:
            Dv = tl.load(D_ptr + head * P + offs_p, mask=p_mask, other=0.0).to(CDT)
        else:
            Dv = tl.load(D_ptr + head).to(CDT)
    return A, bias, Dv


@triton.jit
def _d_skip(y, xf, Dv, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr):
    """``y + D x`` (D per head, or per channel of the block of P) for a chunk's ``(Q, P)`` rows."""
    if HAS_D:
        if D_PER_CHANNEL:
            y += xf * Dv[None, :]
        else:
            y += xf * Dv
    return y


@triton.jit
def _load_state(ptr, sidx, state_offs, state_mask, PRESENT: tl.constexpr, CDT: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A ``(P, N)`` state from ``ptr`` (zeros when not ``PRESENT``)."""
    if PRESENT:
        return tl.load(ptr + sidx + state_offs, mask=state_mask, other=0.0).to(CDT)
    return tl.zeros((BLOCK_P, BLOCK_N), dtype=CDT)


@triton.jit
def _tile(p0, P, N, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's token, state-row (from ``p0``) and state-column offsets and their masks."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    return tl.arange(0, BLOCK_Q), offs_p, offs_n, offs_p < P, offs_n < N


@triton.jit
def _chunk_rows(c0, offs_q, length, p_mask, n_mask):
    """A chunk's token indices from ``c0``, the mask of those inside the sequence, and that mask
    crossed with the state-row and state-column masks."""
    t = (c0 + offs_q).to(tl.int64)
    t_mask = t < length
    return t, t_mask, t_mask[:, None] & p_mask[None, :], t_mask[:, None] & n_mask[None, :]


@triton.jit
def _ssd_fwd(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, cu_ptr,
    y_ptr, hT_ptr,
    seqlen, H, P, N, heads_per_group, dt_min, dt_max,
    stride_x_b, stride_x_t, stride_x_h,
    stride_dt_b, stride_dt_t,
    stride_B_b, stride_B_t, stride_B_g,
    stride_z_b, stride_z_t, stride_z_h,
    stride_y_b, stride_y_t, stride_y_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_sh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seq = pid_sh // H
    head = pid_sh % H
    grp = head // heads_per_group
    row, start, length, first_chunk = _bounds(cu_ptr, cu_ptr, seq, seqlen, 0, VARLEN)
    offs_q, offs_p, offs_n, p_mask, n_mask = _tile(pid_p * BLOCK_P, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)

    x_base = x_ptr + row * stride_x_b + head * stride_x_h + start * stride_x_t
    y_base = y_ptr + row * stride_y_b + head * stride_y_h + start * stride_y_t
    z_base = z_ptr + row * stride_z_b + head * stride_z_h + start * stride_z_t
    dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
    B_base = B_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t
    C_base = C_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t

    A, bias, Dv = _head_params(A_ptr, bias_ptr, D_ptr, head, P, offs_p, p_mask, HAS_BIAS, HAS_D,
                               D_PER_CHANNEL, CDT)
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = p_mask[:, None] & n_mask[None, :]
    sidx = (seq * H + head).to(tl.int64) * P * N
    h = _load_state(h0_ptr, sidx, state_offs, state_mask, HAS_H0, CDT, BLOCK_P, BLOCK_N)
    causal = offs_q[:, None] >= offs_q[None, :]
    prec: tl.constexpr = "ieee" if IEEE else "tf32"

    for c0 in range(0, length, BLOCK_Q):
        t = (c0 + offs_q).to(tl.int64)
        t_mask = t < length
        dlt, _, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                              CDT, BLOCK_Q)
        x = tl.load(x_base + t[:, None] * stride_x_t + offs_p[None, :],
                    mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        Bm = tl.load(B_base + t[:, None] * stride_B_t + offs_n[None, :],
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        Cm = tl.load(C_base + t[:, None] * stride_B_t + offs_n[None, :],
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        # state entering the chunk -> output: exp(c_i) C_i h
        y = tl.dot(Cm, tl.trans(h.to(Cm.dtype)), input_precision=prec) * tl.exp(cum)[:, None]
        # diagonal block: (L ∘ C Bᵀ) Δx
        cb = tl.dot(Cm, tl.trans(Bm), input_precision=prec)
        seg = tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))
        m = cb * tl.exp(seg) * dlt[None, :]
        y += tl.dot(m.to(x.dtype), x, input_precision=prec)
        # the chunk's state: h <- exp(c_Q) h + (exp(c_Q - c) Δ x)ᵀ B
        w = (tl.exp(c_last - cum) * dlt)[:, None] * x.to(CDT)
        h = h * tl.exp(c_last) + tl.dot(tl.trans(w.to(Bm.dtype)), Bm, input_precision=prec)
        xf = x.to(CDT)
        y = _d_skip(y, xf, Dv, HAS_D, D_PER_CHANNEL)
        if HAS_Z:
            zz = tl.load(z_base + t[:, None] * stride_z_t + offs_p[None, :],
                         mask=t_mask[:, None] & p_mask[None, :], other=0.0).to(CDT)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_base + t[:, None] * stride_y_t + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & p_mask[None, :])
    if STORE_HT:
        tl.store(hT_ptr + sidx + state_offs, h, mask=state_mask)


@triton.jit
def _ssd_states_fwd(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, h0_ptr, cu_ptr, choff_ptr, S_ptr, hT_ptr,
    seqlen, H, P, N, heads_per_group, nchunks_max, dt_min, dt_max,
    stride_x_b, stride_x_t, stride_x_h, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_B_g,
    HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The state entering every chunk, ``S[chunk, head] (P, N)`` (and the final state with
    ``STORE_HT``): the forward's recurrence over chunks without the outputs. The rows of a state
    evolve independently, so one program owns a block of ``BLOCK_P`` of them."""
    pid_sh = tl.program_id(0)
    seq = pid_sh // H
    head = pid_sh % H
    grp = head // heads_per_group
    row, start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    offs_q, offs_p, offs_n, p_mask, n_mask = _tile(tl.program_id(1) * BLOCK_P, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)
    x_base = x_ptr + row * stride_x_b + head * stride_x_h + start * stride_x_t
    dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
    B_base = B_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t
    A = tl.load(A_ptr + head).to(CDT)
    bias = tl.load(bias_ptr + head).to(CDT) if HAS_BIAS else 0.0
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = p_mask[:, None] & n_mask[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + (seq * H + head).to(tl.int64) * P * N + state_offs, mask=state_mask,
                    other=0.0).to(CDT)
    else:
        h = tl.zeros((BLOCK_P, BLOCK_N), dtype=CDT)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    for c0 in range(0, length, BLOCK_Q):
        tl.store(S_ptr + ((chunk0 + c0 // BLOCK_Q) * H + head) * P * N + state_offs,
                 h.to(S_ptr.dtype.element_ty), mask=state_mask)
        t = (c0 + offs_q).to(tl.int64)
        t_mask = t < length
        dlt, _, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                              CDT, BLOCK_Q)
        x = tl.load(x_base + t[:, None] * stride_x_t + offs_p[None, :],
                    mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        Bm = tl.load(B_base + t[:, None] * stride_B_t + offs_n[None, :],
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        w = (tl.exp(c_last - cum) * dlt)[:, None] * x.to(CDT)
        h = h * tl.exp(c_last) + tl.dot(tl.trans(w.to(Bm.dtype)), Bm, input_precision=prec)
    if STORE_HT:
        tl.store(hT_ptr + (seq * H + head).to(tl.int64) * P * N + state_offs, h, mask=state_mask)


@triton.jit
def _ssd_fwd_chunk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_ptr, choff_ptr, S_ptr, y_ptr,
    seqlen, H, P, N, heads_per_group, nchunks_max, dt_min, dt_max,
    stride_x_b, stride_x_t, stride_x_h, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_B_g,
    stride_z_b, stride_z_t, stride_z_h, stride_y_b, stride_y_t, stride_y_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr, DT_SOFTPLUS: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The output of one (sequence, head, chunk, block of P) from the state entering the chunk
    (``S``, from :func:`_ssd_states_fwd`): the forward's chunk body without the state update.
    Grid ``(sequences · H · nchunks_max, blocks of P)``."""
    pid, seq, head, grp, k, row, start, length, chunk0 = _chunk_program(cu_ptr, choff_ptr, seqlen, H, heads_per_group,
                                                                         nchunks_max, VARLEN)
    c0 = k * BLOCK_Q
    if c0 < length:
        offs_q, offs_p, offs_n, p_mask, n_mask = _tile(tl.program_id(1) * BLOCK_P, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)
        A, bias, Dv = _head_params(A_ptr, bias_ptr, D_ptr, head, P, offs_p, p_mask, HAS_BIAS, HAS_D,
                                   D_PER_CHANNEL, CDT)
        t, t_mask, qp_mask, qn_mask = _chunk_rows(c0, offs_q, length, p_mask, n_mask)
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
        dlt, _, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                            CDT, BLOCK_Q)
        bc = row * stride_B_b + grp * stride_B_g + (start + t)[:, None] * stride_B_t + offs_n[None, :]
        Bm = tl.load(B_ptr + bc, mask=qn_mask, other=0.0)
        Cm = tl.load(C_ptr + bc, mask=qn_mask, other=0.0)
        x = tl.load(x_ptr + row * stride_x_b + head * stride_x_h + (start + t)[:, None] * stride_x_t + offs_p[None, :],
                    mask=qp_mask, other=0.0)
        state_offs = offs_p[:, None] * N + offs_n[None, :]
        hp = tl.load(S_ptr + ((chunk0 + k) * H + head) * P * N + state_offs,
                     mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        y = tl.dot(Cm, tl.trans(hp.to(Cm.dtype)), input_precision=prec) * tl.exp(cum)[:, None]
        causal = offs_q[:, None] >= offs_q[None, :]
        cb = tl.dot(Cm, tl.trans(Bm), input_precision=prec)
        m = cb * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))) * dlt[None, :]
        y += tl.dot(m.to(x.dtype), x, input_precision=prec)
        xf = x.to(CDT)
        y = _d_skip(y, xf, Dv, HAS_D, D_PER_CHANNEL)
        if HAS_Z:
            zz = tl.load(z_ptr + row * stride_z_b + head * stride_z_h + (start + t)[:, None] * stride_z_t
                         + offs_p[None, :], mask=qp_mask, other=0.0).to(CDT)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_ptr + row * stride_y_b + head * stride_y_h + (start + t)[:, None] * stride_y_t + offs_p[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=qp_mask)


@triton.jit
def _ssd_dstates_bwd(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, cu_ptr, choff_ptr, dy_ptr, dhT_ptr, dS_ptr, dh0_ptr,
    seqlen, H, P, N, heads_per_group, nchunks_max, dt_min, dt_max,
    stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_B_g,
    stride_z_b, stride_z_t, stride_z_h, stride_dy_b, stride_dy_t, stride_dy_h,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
    VARLEN: tl.constexpr, DT_SOFTPLUS: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The state's adjoint leaving every chunk, ``dS[chunk, head] (P, N)``, and entering the
    sequence (``dh0``): the chunks in reverse order, ``dh <- exp(c_Q) dh + (exp(c) ∘ dy)ᵀ C`` with
    ``dy`` the gradient before the gate. One program per block of ``BLOCK_P`` rows, as the states."""
    pid_sh = tl.program_id(0)
    seq = pid_sh // H
    head = pid_sh % H
    grp = head // heads_per_group
    row, start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    offs_q, offs_p, offs_n, p_mask, n_mask = _tile(tl.program_id(1) * BLOCK_P, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)
    dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
    C_base = C_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t
    dy_base = dy_ptr + row * stride_dy_b + head * stride_dy_h + start * stride_dy_t
    z_base = z_ptr + row * stride_z_b + head * stride_z_h + start * stride_z_t
    A = tl.load(A_ptr + head).to(CDT)
    bias = tl.load(bias_ptr + head).to(CDT) if HAS_BIAS else 0.0
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = p_mask[:, None] & n_mask[None, :]
    sidx = (seq * H + head).to(tl.int64) * P * N
    dh = _load_state(dhT_ptr, sidx, state_offs, state_mask, HAS_DHT, CDT, BLOCK_P, BLOCK_N)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    nch = tl.cdiv(length, BLOCK_Q)
    for i in range(0, nch):
        k = nch - 1 - i
        tl.store(dS_ptr + ((chunk0 + k) * H + head) * P * N + state_offs, dh.to(dS_ptr.dtype.element_ty),
                 mask=state_mask)
        t = (k * BLOCK_Q + offs_q).to(tl.int64)
        t_mask = t < length
        qp_mask = t_mask[:, None] & p_mask[None, :]
        _, _, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                          CDT, BLOCK_Q)
        Cm = tl.load(C_base + t[:, None] * stride_B_t + offs_n[None, :],
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        dy = tl.load(dy_base + t[:, None] * stride_dy_t + offs_p[None, :], mask=qp_mask, other=0.0).to(CDT)
        if HAS_Z:
            zz = tl.load(z_base + t[:, None] * stride_z_t + offs_p[None, :], mask=qp_mask, other=0.0).to(CDT)
            dy = dy * zz * tl.sigmoid(zz)
        dh = dh * tl.exp(c_last) + tl.dot(tl.trans((dy * tl.exp(cum)[:, None]).to(Cm.dtype)), Cm,
                                          input_precision=prec)
    if HAS_H0:
        tl.store(dh0_ptr + sidx + state_offs, dh, mask=state_mask)


@triton.jit
def _ssd_bwd(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_ptr, choff_ptr, S_ptr, dS_ptr,
    dy_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dys_ptr, dA_ptr, dD_ptr, dbias_ptr,
    seqlen, H, P, N, heads_per_group, nchunks_max, dt_min, dt_max,
    stride_x_b, stride_x_t, stride_x_h, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_B_g,
    stride_z_b, stride_z_t, stride_z_h, stride_dy_b, stride_dy_t, stride_dy_h,
    stride_dx_b, stride_dx_t, stride_dx_h, stride_dz_b, stride_dz_t, stride_dz_h,
    stride_ddt_b, stride_ddt_t, stride_ys_b, stride_ys_t, stride_ys_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (sequence, head, chunk), from the state entering the chunk (``S``) and the adjoint
    leaving it (``dS``): dx, dΔ (through softplus and the clamp), dz, the pre-gate dy for the B/C
    pass, and the chunk's terms of dA, dD and d(dt_bias) (summed on the host). Grid
    ``(sequences · H · nchunks_max,)``."""
    pid, seq, head, grp, k, row, start, length, chunk0 = _chunk_program(cu_ptr, choff_ptr, seqlen, H, heads_per_group,
                                                                         nchunks_max, VARLEN)
    c0 = k * BLOCK_Q
    if c0 < length:
        offs_q, offs_p, offs_n, p_mask, n_mask = _tile(0, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)
        x_base = x_ptr + row * stride_x_b + head * stride_x_h + start * stride_x_t
        dx_base = dx_ptr + row * stride_dx_b + head * stride_dx_h + start * stride_dx_t
        dys_base = dys_ptr + row * stride_ys_b + head * stride_ys_h + start * stride_ys_t
        dy_base = dy_ptr + row * stride_dy_b + head * stride_dy_h + start * stride_dy_t
        z_base = z_ptr + row * stride_z_b + head * stride_z_h + start * stride_z_t
        dz_base = dz_ptr + row * stride_dz_b + head * stride_dz_h + start * stride_dz_t
        dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
        ddt_base = ddt_ptr + row * stride_ddt_b + head + start * stride_ddt_t
        B_base = B_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t
        C_base = C_ptr + row * stride_B_b + grp * stride_B_g + start * stride_B_t
        A, bias, Dv = _head_params(A_ptr, bias_ptr, D_ptr, head, P, offs_p, p_mask, HAS_BIAS, HAS_D,
                                   D_PER_CHANNEL, CDT)
        state_offs = offs_p[:, None] * N + offs_n[None, :]
        state_mask = p_mask[:, None] & n_mask[None, :]
        causal = offs_q[:, None] >= offs_q[None, :]
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        sk = ((chunk0 + k) * H + head) * P * N
        dh = tl.load(dS_ptr + sk + state_offs, mask=state_mask, other=0.0).to(CDT)
        hp = tl.load(S_ptr + sk + state_offs, mask=state_mask, other=0.0).to(CDT)
        t, t_mask, qp_mask, qn_mask = _chunk_rows(c0, offs_q, length, p_mask, n_mask)
        dlt, deriv, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                                CDT, BLOCK_Q)
        x = tl.load(x_base + t[:, None] * stride_x_t + offs_p[None, :], mask=qp_mask, other=0.0)
        Bm = tl.load(B_base + t[:, None] * stride_B_t + offs_n[None, :], mask=qn_mask, other=0.0)
        Cm = tl.load(C_base + t[:, None] * stride_B_t + offs_n[None, :], mask=qn_mask, other=0.0)
        xf = x.to(CDT)
        dy = tl.load(dy_base + t[:, None] * stride_dy_t + offs_p[None, :], mask=qp_mask, other=0.0).to(CDT)
        e_cum = tl.exp(cum)
        decay_end = tl.exp(c_last - cum)
        cb = tl.dot(Cm, tl.trans(Bm), input_precision=prec)
        lcb = cb * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        y_off = tl.dot(Cm, tl.trans(hp.to(Cm.dtype)), input_precision=prec)  # (C h), before exp(cum)
        if HAS_Z:
            zz = tl.load(z_base + t[:, None] * stride_z_t + offs_p[None, :], mask=qp_mask, other=0.0).to(CDT)
            y = tl.dot((lcb * dlt[None, :]).to(x.dtype), x, input_precision=prec) + y_off * e_cum[:, None]
            y = _d_skip(y, xf, Dv, HAS_D, D_PER_CHANNEL)
            sz = tl.sigmoid(zz)
            dz = dy * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_base + t[:, None] * stride_dz_t + offs_p[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=qp_mask)
            dy = dy * zz * sz
        tl.store(dys_base + t[:, None] * stride_ys_t + offs_p[None, :], dy.to(dys_ptr.dtype.element_ty),
                 mask=qp_mask)
        dyd = dy.to(x.dtype)
        # gradient of Δx: the diagonal block's transpose and the state leaving the chunk
        bdh = tl.dot(Bm, tl.trans(dh.to(Bm.dtype)), input_precision=prec)  # (Q, P)
        dxp = tl.dot(tl.trans(lcb.to(x.dtype)), dyd, input_precision=prec) + decay_end[:, None] * bdh
        dx = dlt[:, None] * dxp
        out = pid.to(tl.int64)  # (sequence, head, chunk)
        if HAS_D:
            if D_PER_CHANNEL:
                dx += dy * Dv[None, :]
            else:
                dx += dy * Dv
            # per channel (the host sums them over chunks, and over channels for D per head)
            tl.store(dD_ptr + out * BLOCK_P + offs_p, tl.sum(dy * xf, axis=0))
        tl.store(dx_base + t[:, None] * stride_dx_t + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=qp_mask)
        ddlt = tl.sum(xf * dxp, axis=1)
        # gradient of the prefix sums c
        gm = tl.dot(dyd, tl.trans(x), input_precision=prec) * lcb * dlt[None, :]  # (Q, Q)
        dcum = tl.sum(gm, axis=1) - tl.sum(gm, axis=0)
        dcum += tl.sum(dy * y_off, axis=1) * e_cum
        term = decay_end * dlt * tl.sum(xf * bdh, axis=1)
        dlast = tl.sum(term, axis=0) + tl.exp(c_last) * tl.sum(tl.sum(dh * hp, axis=1), axis=0)
        dcum = dcum - term + tl.where(offs_q == BLOCK_Q - 1, dlast, 0.0)
        da = tl.sum(dcum, axis=0) - tl.cumsum(dcum, axis=0) + dcum  # reverse prefix sums
        ddlt += A * da
        ddt = ddlt * deriv
        tl.store(ddt_base + t * stride_ddt_t, ddt.to(ddt_ptr.dtype.element_ty), mask=t_mask)
        tl.store(dA_ptr + out, tl.sum(dlt * da, axis=0))
        if HAS_BIAS:
            tl.store(dbias_ptr + out, tl.sum(ddt, axis=0))


@triton.jit
def _ssd_bwd_dbc(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, cu_ptr, choff_ptr, S_ptr, dS_ptr, dys_ptr,
    dB_ptr, dC_ptr,
    seqlen, H, P, N, heads_per_group, nchunks_max, dt_min, dt_max, heads_per_prog, splits,
    stride_x_b, stride_x_t, stride_x_h, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_B_g,
    stride_ys_b, stride_ys_t, stride_ys_h, stride_dB_s, stride_dB_b, stride_dB_t, stride_dB_g,
    HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dB and dC of one (sequence, chunk, group), summed over ``heads_per_prog`` of the group's
    heads: with ``splits`` > 1 programs per group, each writes its partial sums to its own slice
    (``stride_dB_s``) and the host adds them."""
    seq = tl.program_id(0) // nchunks_max  # (grid: sequences · chunks, groups · splits)
    k = tl.program_id(0) % nchunks_max
    grp = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    row, start, length, chunk0 = _bounds(cu_ptr, choff_ptr, seq, seqlen, nchunks_max, VARLEN)
    c0 = k * BLOCK_Q
    if c0 < length:
        offs_q, offs_p, offs_n, p_mask, n_mask = _tile(0, P, N, BLOCK_Q, BLOCK_P, BLOCK_N)
        t, t_mask, qp_mask, qn_mask = _chunk_rows(c0, offs_q, length, p_mask, n_mask)
        bc_off = row * stride_B_b + grp * stride_B_g + (start + t)[:, None] * stride_B_t + offs_n[None, :]
        Bm = tl.load(B_ptr + bc_off, mask=qn_mask, other=0.0)
        Cm = tl.load(C_ptr + bc_off, mask=qn_mask, other=0.0)
        dbc_off = (split * stride_dB_s + row * stride_dB_b + grp * stride_dB_g + (start + t)[:, None] * stride_dB_t
                   + offs_n[None, :])
        state_offs = offs_p[:, None] * N + offs_n[None, :]
        state_mask = p_mask[:, None] & n_mask[None, :]
        causal = offs_q[:, None] >= offs_q[None, :]
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        dB = tl.zeros((BLOCK_Q, BLOCK_N), dtype=CDT)
        dC = tl.zeros((BLOCK_Q, BLOCK_N), dtype=CDT)
        for j in range(split * heads_per_prog, tl.minimum((split + 1) * heads_per_prog, heads_per_group)):
            head = grp * heads_per_group + j
            A = tl.load(A_ptr + head).to(CDT)
            bias = tl.load(bias_ptr + head).to(CDT) if HAS_BIAS else 0.0
            dt_base = dt_ptr + row * stride_dt_b + head + start * stride_dt_t
            dlt, _, cum, c_last = _chunk_decays(dt_base, bias, A, t, t_mask, stride_dt_t, DT_SOFTPLUS, dt_min, dt_max,
                                                  CDT, BLOCK_Q)
            x_off = row * stride_x_b + head * stride_x_h + (start + t)[:, None] * stride_x_t + offs_p[None, :]
            x = tl.load(x_ptr + x_off, mask=qp_mask, other=0.0)
            ys_off = row * stride_ys_b + head * stride_ys_h + (start + t)[:, None] * stride_ys_t + offs_p[None, :]
            dy = tl.load(dys_ptr + ys_off, mask=qp_mask, other=0.0).to(x.dtype)
            sk = ((chunk0 + k) * H + head) * P * N
            hp = tl.load(S_ptr + sk + state_offs, mask=state_mask, other=0.0)
            dh = tl.load(dS_ptr + sk + state_offs, mask=state_mask, other=0.0)
            lm = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            wm = tl.dot(dy, tl.trans(x), input_precision=prec) * lm * dlt[None, :]  # (Q, Q)
            dC += tl.dot(wm.to(Bm.dtype), Bm, input_precision=prec)
            dC += tl.dot(dy, hp.to(x.dtype), input_precision=prec) * tl.exp(cum)[:, None]
            dB += tl.dot(tl.trans(wm.to(Cm.dtype)), Cm, input_precision=prec)
            dB += tl.dot(x, dh.to(x.dtype), input_precision=prec) * (tl.exp(c_last - cum) * dlt)[:, None]
        tl.store(dB_ptr + dbc_off, dB.to(dB_ptr.dtype.element_ty), mask=qn_mask)
        tl.store(dC_ptr + dbc_off, dC.to(dC_ptr.dtype.element_ty), mask=qn_mask)
