"""Triton kernels of the chunked Mamba-3 scan (imported on first use; see :mod:`ssmkit.ops.mamba3.triton`).

They compute the chunked form's linear recurrence (``chunked.py``; README.md) from the prepared
per-token tensors, per head::

    h'_t = exp(dA_t) h'_{t-1} + s_t Σ_r v_{t,r} k_{t,r}ᵀ,
    y_{t,r} = h'_t q_{t,r} - (s_t - γ_t) Σ_r' (q_{t,r}·k_{t,r'}) v_{t,r'}

over rows ``m = t·R + r`` (token t, rank r): for one (batch row, head) the rows of ``q, k (b, l, R,
H, N)`` and ``v, y (b, l, R, H, P)`` are evenly spaced, so SISO (R = 1) and MIMO are one kernel
whose chunks are ``BLOCK_M`` rows, ``BLOCK_M // R`` tokens. A token's decay goes on its first
rank's row only, so the prefix sums over rows are the tokens' prefix sums on all of its ranks.

Forward: ``_m3_states`` (per (row, head, chunk): the chunk's state from zero, one matmul, and its
total log decay), ``_m3_pass`` (per (row, head, block of the state): the states entering each
chunk, sequential over chunks, elementwise), ``_m3_out`` (per (row, head, chunk): ``(W ∘ q kᵀ) v``
plus the entering state's ``exp(c) q hᵀ``, W the decay-and-trapezoid weights). Backward:
``_m3_states`` again (the states, and each chunk's own part of the state's adjoint,
``Σ exp(c_i) dy_i q_iᵀ``), ``_m3_pass`` forwards (entering states) and backwards (the adjoint
leaving each chunk, and the initial state's gradient), then ``_m3_bwd`` per chunk: dq, dk, dv,
and the gradients of the log decays, the weights s and γ.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(H, NC):
    """(batch row, head, chunk) of a program of a one-dimensional grid of b·H·NC (no 65,535 limit
    on the chunks, as a grid's second axis would have)."""
    pid = tl.program_id(0)
    return pid // (H * NC), (pid // NC) % H, pid % NC


@triton.jit
def _rows(c, L, R, QT, BLOCK_M: tl.constexpr):
    """A chunk's rows: their index in the block, their token, whether they exist, whether they are
    a token's first rank, and their row index ``t·R + r`` in the sequence (int64)."""
    offs_m = tl.arange(0, BLOCK_M)
    tok = c * QT + offs_m // R
    valid = (offs_m < QT * R) & (tok < L)
    first = (offs_m % R) == 0
    row = c.to(tl.int64) * QT * R + offs_m
    return offs_m, tok, valid, first, row


@triton.jit
def _decays(dA_ptr, w_ptr, tok_base, tok, valid, first, H, CDT: tl.constexpr):
    """Prefix sums ``c`` of the log decays over the chunk's rows (a token's decay on its first
    rank's row), their total, and the per-token weights at ``w_ptr`` (0 on missing rows)."""
    off = tok_base + tok.to(tl.int64) * H
    a = tl.load(dA_ptr + off, mask=valid & first, other=0.0).to(CDT)
    cum = tl.cumsum(a, axis=0)
    total = tl.sum(a, axis=0)
    w = tl.load(w_ptr + off, mask=valid, other=0.0).to(CDT)
    return cum, total, w


@triton.jit
def _tile(ptr, rowg, valid, H, h, D, offs_d, CDT: tl.constexpr):
    """Rows ``rowg`` of head ``h`` of a ``(..., H, D)`` tensor as a ``(BLOCK_M, BLOCK_D)`` tile."""
    mask = valid[:, None] & (offs_d < D)[None, :]
    t = tl.load(ptr + (rowg * H + h)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return t.to(CDT)


@triton.jit
def _weights(cum, s, g, offs_m, R):
    """The within-chunk weights ``W[i, j] = exp(c_i - c_j) s_j`` for token(i) > token(j), ``γ_j`` on
    a token's own (R x R) tile, 0 above; also the decays and both masks."""
    ti = offs_m // R
    strict = ti[:, None] > ti[None, :]
    same = ti[:, None] == ti[None, :]
    decay = tl.exp(tl.where(strict, cum[:, None] - cum[None, :], float("-inf")))
    W = decay * s[None, :] + tl.where(same, g[None, :], 0.0)
    return W, decay, strict, same


@triton.jit
def _m3_states(
    q_ptr, k_ptr, v_ptr, dy_ptr, dA_ptr, s_ptr, st_ptr, tot_ptr, dst_ptr,
    L, H, R, N, P, QT, NC,
    WITH_DY: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per (row, head, chunk): the chunk's state from zero ``Σ_j exp(c_Q - c_j) s_j v_j k_jᵀ (P, N)``
    and its total log decay; with ``WITH_DY`` also its part of the state's adjoint
    ``Σ_i exp(c_i) dy_i q_iᵀ``."""
    bb, h, c = _program(H, NC)
    prec: tl.constexpr = "ieee" if IEEE else "tf32x3"
    offs_m, tok, valid, first, row = _rows(c, L, R, QT, BLOCK_M)
    cum, total, s = _decays(dA_ptr, s_ptr, bb.to(tl.int64) * L * H + h, tok, valid, first, H, CDT)
    rowg = bb.to(tl.int64) * L * R + row
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    kk = _tile(k_ptr, rowg, valid, H, h, N, offs_n, CDT)
    vv = _tile(v_ptr, rowg, valid, H, h, P, offs_p, CDT)
    f = tl.exp(total - cum) * s
    st = tl.dot(tl.trans(vv * f[:, None]), kk, input_precision=prec, out_dtype=CDT)
    cidx = (bb * NC + c) * H + h
    sidx = cidx.to(tl.int64) * P * N
    smask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    soffs = offs_p[:, None] * N + offs_n[None, :]
    tl.store(st_ptr + sidx + soffs, st, mask=smask)
    tl.store(tot_ptr + cidx, total)
    if WITH_DY:
        qq = _tile(q_ptr, rowg, valid, H, h, N, offs_n, CDT)
        dy = _tile(dy_ptr, rowg, valid, H, h, P, offs_p, CDT)
        dl = tl.dot(tl.trans(dy * tl.exp(cum)[:, None]), qq, input_precision=prec, out_dtype=CDT)
        tl.store(dst_ptr + sidx + soffs, dl, mask=smask)


@triton.jit
def _m3_pass(io_ptr, tot_ptr, init_ptr, fin_ptr, H, PN, NC,
             REVERSE: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Sequential over chunks, for one (row, head, block of the flattened state): forwards,
    ``io[c]`` (the chunk's own state) becomes the state entering chunk c and ``fin`` the final
    state; backwards (the adjoint), ``io[c]`` (the chunk's own adjoint) becomes the adjoint of
    the state leaving chunk c and ``fin`` the initial state's. ``x <- exp(total_c) x + own_c``."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    bb = pid // H
    h = pid % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    sbase = (bb * H + h).to(tl.int64) * PN
    x = tl.load(init_ptr + sbase + offs, mask=m, other=0.0).to(CDT)
    for i in range(NC):
        if REVERSE:
            c = NC - 1 - i
        else:
            c = i
        cidx = (bb * NC + c) * H + h
        ptr = io_ptr + cidx.to(tl.int64) * PN + offs
        own = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, x, mask=m)
        x = x * tl.exp(tl.load(tot_ptr + cidx)) + own
    tl.store(fin_ptr + sbase + offs, x, mask=m)


@triton.jit
def _chunk_inputs(q_ptr, k_ptr, v_ptr, dA_ptr, s_ptr, g_ptr, L, H, R, N, P, QT, NC, CDT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """What :func:`_m3_out` and :func:`_m3_bwd` both start from: the program's head, its rows
    (token, validity, first rank row, global row), the log decays' prefix sums, s and γ, the q, k,
    v tiles, and the offset and mask of its chunk's ``(P, N)`` state."""
    bb, h, c = _program(H, NC)
    offs_m, tok, valid, first, row = _rows(c, L, R, QT, BLOCK_M)
    tok_base = bb.to(tl.int64) * L * H + h
    cum, total, s = _decays(dA_ptr, s_ptr, tok_base, tok, valid, first, H, CDT)
    g = tl.load(g_ptr + tok_base + tok.to(tl.int64) * H, mask=valid, other=0.0).to(CDT)
    rowg = bb.to(tl.int64) * L * R + row
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    qq = _tile(q_ptr, rowg, valid, H, h, N, offs_n, CDT)
    kk = _tile(k_ptr, rowg, valid, H, h, N, offs_n, CDT)
    vv = _tile(v_ptr, rowg, valid, H, h, P, offs_p, CDT)
    sidx = ((bb * NC + c) * H + h).to(tl.int64) * P * N
    smask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    return (h, offs_m, tok, valid, first, tok_base, cum, total, s, g, rowg, offs_n, offs_p, qq, kk, vv,
            sidx, smask)


@triton.jit
def _m3_out(
    q_ptr, k_ptr, v_ptr, dA_ptr, s_ptr, g_ptr, st_ptr, y_ptr,
    L, H, R, N, P, QT, NC,
    IEEE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per (row, head, chunk): ``y = (W ∘ q kᵀ) v + exp(c) ∘ (q hᵀ)``, h the state entering the chunk."""
    prec: tl.constexpr = "ieee" if IEEE else "tf32x3"
    (h, offs_m, tok, valid, first, tok_base, cum, total, s, g, rowg, offs_n, offs_p, qq, kk, vv,
     sidx, smask) = _chunk_inputs(q_ptr, k_ptr, v_ptr, dA_ptr, s_ptr, g_ptr, L, H, R, N, P, QT, NC,
                                  CDT, BLOCK_M, BLOCK_N, BLOCK_P)
    hp = tl.load(st_ptr + sidx + offs_p[:, None] * N + offs_n[None, :], mask=smask, other=0.0)
    W, _, _, _ = _weights(cum, s, g, offs_m, R)
    qk = tl.dot(qq, tl.trans(kk), input_precision=prec, out_dtype=CDT)
    y = tl.dot((qk * W), vv, input_precision=prec, out_dtype=CDT)
    y += tl.exp(cum)[:, None] * tl.dot(qq, tl.trans(hp), input_precision=prec, out_dtype=CDT)
    ymask = valid[:, None] & (offs_p < P)[None, :]
    tl.store(y_ptr + (rowg * H + h)[:, None] * P + offs_p[None, :], y.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _m3_bwd(
    q_ptr, k_ptr, v_ptr, dy_ptr, dA_ptr, s_ptr, g_ptr, st_ptr, dso_ptr,
    dq_ptr, dk_ptr, dv_ptr, ddA_ptr, ds_ptr, dg_ptr,
    L, H, R, N, P, QT, NC,
    IEEE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per (row, head, chunk), from the state entering the chunk ``hp`` and the adjoint of the
    state leaving it ``dso``: dq, dk, dv; the log decays' gradient (on each token's first rank
    row) and, per row, those of s and γ (summed over the ranks on the host)."""
    prec: tl.constexpr = "ieee" if IEEE else "tf32x3"
    (h, offs_m, tok, valid, first, tok_base, cum, total, s, g, rowg, offs_n, offs_p, qq, kk, vv,
     sidx, smask) = _chunk_inputs(q_ptr, k_ptr, v_ptr, dA_ptr, s_ptr, g_ptr, L, H, R, N, P, QT, NC,
                                  CDT, BLOCK_M, BLOCK_N, BLOCK_P)
    dy = _tile(dy_ptr, rowg, valid, H, h, P, offs_p, CDT)
    soffs = offs_p[:, None] * N + offs_n[None, :]
    W, decay, strict, same = _weights(cum, s, g, offs_m, R)
    e = tl.exp(cum)
    to_end = tl.exp(total - cum)
    f = to_end * s
    nmask = valid[:, None] & (offs_n < N)[None, :]
    pmask = valid[:, None] & (offs_p < P)[None, :]
    # within the chunk: (M, M) products, the gradient of W
    qk = tl.dot(qq, tl.trans(kk), input_precision=prec, out_dtype=CDT)
    dyv = tl.dot(dy, tl.trans(vv), input_precision=prec, out_dtype=CDT)  # dy_i · v_j
    wdyv = W * dyv
    dW = dyv * qk
    ds = tl.sum(tl.where(strict, dW * decay, 0.0), axis=0)
    dg = tl.sum(tl.where(same, dW, 0.0), axis=0)
    gs = tl.where(strict, dW * W, 0.0)
    dcum = tl.sum(gs, axis=1) - tl.sum(gs, axis=0)
    # (the outputs are written as soon as they are complete: fewer operand buffers live at once)
    hp = tl.load(st_ptr + sidx + soffs, mask=smask, other=0.0)
    dyh = tl.dot(dy, hp, input_precision=prec, out_dtype=CDT)  # (M, N): dy_i h
    dq = tl.dot(wdyv, kk, input_precision=prec, out_dtype=CDT) + e[:, None] * dyh
    tl.store(dq_ptr + (rowg * H + h)[:, None] * N + offs_n[None, :], dq, mask=nmask)
    dcum += tl.sum(qq * dyh, axis=1) * e
    dso = tl.load(dso_ptr + sidx + soffs, mask=smask, other=0.0)
    kds = tl.dot(kk, tl.trans(dso), input_precision=prec, out_dtype=CDT)  # (M, P): dso k_j
    dv = tl.dot(tl.trans(W * qk), dy, input_precision=prec, out_dtype=CDT) + f[:, None] * kds
    tl.store(dv_ptr + (rowg * H + h)[:, None] * P + offs_p[None, :], dv, mask=pmask)
    dk = (tl.dot(tl.trans(wdyv), qq, input_precision=prec, out_dtype=CDT)
          + f[:, None] * tl.dot(vv, dso, input_precision=prec, out_dtype=CDT))
    tl.store(dk_ptr + (rowg * H + h)[:, None] * N + offs_n[None, :], dk, mask=nmask)
    # the scalar weights and the prefix sums of the log decays
    df = tl.sum(vv * kds, axis=1)
    ds += df * to_end
    dcum -= df * f
    dtot = tl.sum(df * f, axis=0) + tl.exp(total) * tl.sum(tl.sum(dso * hp, axis=1), axis=0)
    dcum += tl.where(offs_m == BLOCK_M - 1, dtot, 0.0)
    dA = tl.sum(dcum, axis=0) - tl.cumsum(dcum, axis=0) + dcum  # reverse prefix sums
    tl.store(ddA_ptr + tok_base + tok.to(tl.int64) * H, dA, mask=valid & first)
    tl.store(ds_ptr + rowg * H + h, ds, mask=valid)
    tl.store(dg_ptr + rowg * H + h, dg, mask=valid)
