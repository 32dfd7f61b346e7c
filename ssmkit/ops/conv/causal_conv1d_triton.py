"""``backend="triton"`` form of :func:`ssmkit.ops.causal_conv1d` (forward and backward kernels).

Same signature and results as the ``reference`` form in ``causal_conv1d.py``::

    causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None,
                         return_final_state=False, cu_seqlens=None)

``x``: ``(batch, seqlen, dim)``; ``weight``: ``(dim, W)``; ``initial_state`` / final state:
``(batch | num_seqs, dim, W-1)``, oldest input first. Math::

    y[t, d] = act(bias[d] + Σ_{k<W} weight[d, k] · x[t - (W-1) + k, d])

with inputs before a sequence's start taken from ``initial_state`` (zeros without one).

Kernels read a padded input: without an initial state the sequence itself with implicit zeros
before it; with one, the state rows are prepended (one copy in torch), so every output row ``t``
reads input rows ``t + k - (W-1) + S`` (``S = W-1`` with prepended state, else 0). The backward
runs two kernels: ``dy_pre = dy · act'`` with per-tile partial sums of dweight and dbias (summed
by the caller: no atomics, bitwise reproducible), then ``dx`` from ``dy_pre``. The final state
(the last ``W-1`` inputs) is gathered with torch indexing so autograd covers it.

Imports without Triton; the kernels compile on first use. Registered as ``("causal_conv1d",
"triton")`` when ``ssmkit.ops.conv`` imports this module.
"""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register

__all__ = ["causal_conv1d_triton"]

_kernels = None


def _get_kernels():
    global _kernels
    if _kernels is None:
        _kernels = _build_kernels()
    return _kernels


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_fwd_kernel(
        X, W_, BIAS, Y, CU_IN, CU_OUT, L_in, L_out, dim,
        WIDTH: tl.constexpr, SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        IS_VARLEN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_l = tl.program_id(1)
        pid_d = tl.program_id(2)
        if IS_VARLEN:
            in0 = tl.load(CU_IN + pid_s).to(tl.int64)
            out0 = tl.load(CU_OUT + pid_s).to(tl.int64)
            seqlen = tl.load(CU_OUT + pid_s + 1).to(tl.int64) - out0
        else:
            in0 = pid_s.to(tl.int64) * L_in
            out0 = pid_s.to(tl.int64) * L_out
            seqlen = in0 * 0 + L_out
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            q = t + (k - (WIDTH - 1) + SHIFT)  # input row, relative to the sequence start
            m = ((q >= 0) & (t < seqlen))[:, None] & md[None, :]
            xv = tl.load(X + (in0 + q)[:, None] * dim + d[None, :], mask=m, other=0.0)
            wk = tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(tl.float32)
            acc += xv.to(tl.float32) * wk[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        mo = (t < seqlen)[:, None] & md[None, :]
        tl.store(Y + (out0 + t)[:, None] * dim + d[None, :], acc.to(Y.dtype.element_ty), mask=mo)

    @triton.jit
    def conv_bwd_dy_kernel(
        X, W_, BIAS, DY, DYP, DW_PART, DB_PART, CU_IN, CU_OUT, L_in, L_out, dim, n_lblocks,
        WIDTH: tl.constexpr, SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        IS_VARLEN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_l = tl.program_id(1)
        pid_d = tl.program_id(2)
        if IS_VARLEN:
            in0 = tl.load(CU_IN + pid_s).to(tl.int64)
            out0 = tl.load(CU_OUT + pid_s).to(tl.int64)
            seqlen = tl.load(CU_OUT + pid_s + 1).to(tl.int64) - out0
        else:
            in0 = pid_s.to(tl.int64) * L_in
            out0 = pid_s.to(tl.int64) * L_out
            seqlen = in0 * 0 + L_out
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        mo = (t < seqlen)[:, None] & md[None, :]
        dy = tl.load(DY + (out0 + t)[:, None] * dim + d[None, :], mask=mo, other=0.0).to(tl.float32)
        if SILU:  # recompute the pre-activation: silu'(a) = σ(a)(1 + a(1 - σ(a)))
            acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(WIDTH):
                q = t + (k - (WIDTH - 1) + SHIFT)
                m = ((q >= 0) & (t < seqlen))[:, None] & md[None, :]
                xv = tl.load(X + (in0 + q)[:, None] * dim + d[None, :], mask=m, other=0.0)
                wk = tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(tl.float32)
                acc += xv.to(tl.float32) * wk[None, :]
            if HAS_BIAS:
                acc += tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)[None, :]
            sg = tl.sigmoid(acc)
            dy = dy * sg * (1.0 + acc * (1.0 - sg))
        tl.store(DYP + (out0 + t)[:, None] * dim + d[None, :], dy, mask=mo)
        part = pid_s.to(tl.int64) * n_lblocks + pid_l
        for k in tl.static_range(WIDTH):
            q = t + (k - (WIDTH - 1) + SHIFT)
            m = ((q >= 0) & (t < seqlen))[:, None] & md[None, :]
            xv = tl.load(X + (in0 + q)[:, None] * dim + d[None, :], mask=m, other=0.0)
            dwk = tl.sum(dy * xv.to(tl.float32), axis=0)
            tl.store(DW_PART + (part * dim + d) * WIDTH + k, dwk, mask=md)
        if HAS_BIAS:
            tl.store(DB_PART + part * dim + d, tl.sum(dy, axis=0), mask=md)

    @triton.jit
    def conv_bwd_dx_kernel(
        W_, DYP, DX, CU_IN, CU_OUT, L_in, L_out, dim,
        WIDTH: tl.constexpr, SHIFT: tl.constexpr, IS_VARLEN: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_l = tl.program_id(1)
        pid_d = tl.program_id(2)
        if IS_VARLEN:
            in0 = tl.load(CU_IN + pid_s).to(tl.int64)
            inlen = tl.load(CU_IN + pid_s + 1).to(tl.int64) - in0
            out0 = tl.load(CU_OUT + pid_s).to(tl.int64)
            seqlen = tl.load(CU_OUT + pid_s + 1).to(tl.int64) - out0
        else:
            in0 = pid_s.to(tl.int64) * L_in
            inlen = in0 * 0 + L_in
            out0 = pid_s.to(tl.int64) * L_out
            seqlen = in0 * 0 + L_out
        q = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # input rows
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            t = q - (k - (WIDTH - 1) + SHIFT)  # the output row that reads input q through tap k
            m = ((t >= 0) & (t < seqlen) & (q < inlen))[:, None] & md[None, :]
            g = tl.load(DYP + (out0 + t)[:, None] * dim + d[None, :], mask=m, other=0.0)
            wk = tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(tl.float32)
            acc += g * wk[None, :]
        mi = (q < inlen)[:, None] & md[None, :]
        tl.store(DX + (in0 + q)[:, None] * dim + d[None, :], acc.to(DX.dtype.element_ty), mask=mi)

    return conv_fwd_kernel, conv_bwd_dy_kernel, conv_bwd_dx_kernel


BLOCK_L, BLOCK_D = 64, 64


class _Geo:
    def __init__(self, xin, L_out, cu_in, cu_out, nseq, maxlen_out, maxlen_in):
        self.dim = xin.shape[-1]
        self.nseq = nseq
        self.L_in = xin.shape[1]
        self.L_out = L_out
        self.cu_in, self.cu_out = cu_in, cu_out
        self.varlen = cu_out is not None
        self.n_lblocks = max(1, -(-maxlen_out // BLOCK_L))
        self.n_lblocks_in = max(1, -(-maxlen_in // BLOCK_L))
        self.n_dblocks = -(-self.dim // BLOCK_D)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xin, weight, bias, geo, shift, silu, out_dtype):
        fwd, _, _ = _get_kernels()
        y = torch.empty(xin.shape[0], geo.L_out, geo.dim, device=xin.device, dtype=out_dtype)
        grid = (geo.nseq, geo.n_lblocks, geo.n_dblocks)
        fwd[grid](xin, weight, bias, y, geo.cu_in, geo.cu_out, geo.L_in, geo.L_out, geo.dim,
                  WIDTH=weight.shape[1], SHIFT=shift, HAS_BIAS=bias is not None, SILU=silu,
                  IS_VARLEN=geo.varlen, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
        ctx.save_for_backward(xin, weight, bias)
        ctx.geo, ctx.shift, ctx.silu = geo, shift, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        _, bwd_dy, bwd_dx = _get_kernels()
        xin, weight, bias = ctx.saved_tensors
        geo, shift = ctx.geo, ctx.shift
        W = weight.shape[1]
        dy = dy.contiguous()
        dyp = torch.empty(dy.shape, device=dy.device, dtype=torch.float32)
        nparts = geo.nseq * geo.n_lblocks
        dw_part = torch.empty(nparts, geo.dim, W, device=dy.device, dtype=torch.float32)
        db_part = torch.empty(nparts, geo.dim, device=dy.device, dtype=torch.float32)
        grid = (geo.nseq, geo.n_lblocks, geo.n_dblocks)
        bwd_dy[grid](xin, weight, bias, dy, dyp, dw_part, db_part, geo.cu_in, geo.cu_out,
                     geo.L_in, geo.L_out, geo.dim, geo.n_lblocks, WIDTH=W, SHIFT=shift,
                     HAS_BIAS=bias is not None, SILU=ctx.silu, IS_VARLEN=geo.varlen,
                     BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
        dx = torch.empty_like(xin)
        grid = (geo.nseq, geo.n_lblocks_in, geo.n_dblocks)
        bwd_dx[grid](weight, dyp, dx, geo.cu_in, geo.cu_out, geo.L_in, geo.L_out, geo.dim,
                     WIDTH=W, SHIFT=shift, IS_VARLEN=geo.varlen, BLOCK_L=BLOCK_L,
                     BLOCK_D=BLOCK_D, num_warps=4)
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None, None, None, None


def _final_state(xin, shift, W, lens_in, starts_in, init, nseq, varlen):
    """The last W-1 inputs of each sequence (oldest first), zeros/initial state before its start."""
    bsz, _, dim = xin.shape
    if W == 1:
        return xin.new_zeros(nseq, dim, 0)
    j = torch.arange(W - 1, device=xin.device)
    if not varlen:
        L_in = xin.shape[1]
        if L_in >= W - 1:
            return xin[:, L_in - (W - 1):].transpose(1, 2)
        pad = xin.new_zeros(bsz, W - 1 - L_in, dim)
        return torch.cat([pad, xin], 1)[:, -(W - 1):].transpose(1, 2)
    # varlen (shift == W-1 when an initial state was prepended, so every sequence has >= W-1 rows)
    rows = (starts_in + lens_in)[:, None] - (W - 1) + j[None, :]  # (nseq, W-1)
    ok = rows >= starts_in[:, None]
    g = xin[0].index_select(0, rows.clamp_min(0).reshape(-1)).view(nseq, W - 1, dim)
    g = torch.where(ok[:, :, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g.transpose(1, 2)


@register("causal_conv1d", "triton")
def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None,
                         return_final_state=False, cu_seqlens=None):
    """Triton causal depthwise conv1d; see the module docstring. Inputs assumed validated."""
    bsz, L, dim = x.shape
    W = weight.shape[1]
    silu = activation in ("silu", "swish")
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x = x.contiguous()
    shift = 0
    varlen = cu_seqlens is not None
    if varlen:
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        lens = cu[1:] - cu[:-1]
        nseq = lens.numel()
        maxlen = int(lens.max()) if nseq else 0
    else:
        nseq = bsz
        maxlen = L
    xin = x
    cu_in = cu_out = None
    if initial_state is not None and W > 1:
        shift = W - 1
        st = initial_state.transpose(1, 2).to(x.dtype)  # (nseq, W-1, dim), oldest first
        if not varlen:
            xin = torch.cat([st, x], 1)
        else:
            pieces = []
            c = cu.tolist()
            for i in range(nseq):
                pieces += [st[i], x[0, c[i]:c[i + 1]]]
            xin = torch.cat(pieces, 0).unsqueeze(0)
    if varlen:
        cu_out = cu.contiguous()
        cu_in = (cu + shift * torch.arange(nseq + 1, device=x.device)).contiguous()
    geo = _Geo(xin, L, cu_in, cu_out, nseq, maxlen, maxlen + shift)
    y = _ConvFn.apply(xin, weight, bias, geo, shift, silu, x.dtype)
    if not return_final_state:
        return y
    if varlen:
        starts_in = cu_in[:-1]
        lens_in = lens + shift
    else:
        starts_in = lens_in = None
    final = _final_state(xin, shift, W, lens_in, starts_in, initial_state, nseq, varlen)
    return y, final
