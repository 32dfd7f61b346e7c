"""``backend="triton"`` form of :func:`ssmkit.ops.causal_conv1d` (forward and backward kernels).

Same signature and results as the ``reference`` form in ``causal_conv1d.py``::

    causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None,
                         return_final_state=False, cu_seqlens=None)

``x``: ``(batch, seqlen, dim)``; ``weight``: ``(dim, W)``; ``initial_state`` / final state:
``(batch | num_seqs, dim, W-1)``, oldest input first. Math::

    y[t, d] = act(bias[d] + Σ_{k<W} weight[d, k] · x[t - (W-1) + k, d])

with inputs before a sequence's start taken from ``initial_state`` (zeros without one).

On the autograd path (and with ``cu_seqlens``) the kernels read a contiguous padded input:
without an initial state the sequence itself with implicit zeros before it; with one, the state
rows are prepended (copies of ``x`` and the state in torch), so every output row ``t`` reads
input rows ``t + k - (W-1) + S`` (``S = W-1`` with prepended state, else 0). When no gradient
is needed and there is no ``cu_seqlens`` (inference prefill), no full-size copy is made: the
forward kernel reads ``x`` through its batch and row strides (``x`` is often a strided view of a
projection's output; only a channel stride other than 1 forces a copy) and takes the rows before
the start (``S = 0``, rows ``< 0``) from ``initial_state`` itself, through its strides. The
backward runs two kernels: ``dy_pre = dy · act'`` with per-tile partial sums of dweight and
dbias (summed by the caller: no atomics, bitwise reproducible), then ``dx`` from ``dy_pre``. The
final state (the last ``W-1`` inputs) is gathered with torch indexing so autograd covers it.

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
        X, W_, BIAS, Y, H0, CU_IN, CU_OUT, L_out, dim, stride_xb, stride_xl,
        stride_hb, stride_hd, stride_hw,
        WIDTH: tl.constexpr, SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # X is read through (stride_xb, stride_xl, 1); varlen packs every sequence in batch row 0.
        # With HAS_H0 (no prepended copy, SHIFT == 0) rows q < 0 come from H0 (nseq, dim, W-1), in
        # X's dtype.
        pid_s = tl.program_id(0)
        pid_l = tl.program_id(1)
        pid_d = tl.program_id(2)
        if IS_VARLEN:
            in0 = tl.load(CU_IN + pid_s).to(tl.int64)
            out0 = tl.load(CU_OUT + pid_s).to(tl.int64)
            seqlen = tl.load(CU_OUT + pid_s + 1).to(tl.int64) - out0
            xbase = in0 * stride_xl
        else:
            out0 = pid_s.to(tl.int64) * L_out
            seqlen = out0 * 0 + L_out
            xbase = pid_s.to(tl.int64) * stride_xb
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        xt = X + xbase + t.to(tl.int64)[:, None] * stride_xl + d[None, :]  # row t of the tile
        for k in tl.static_range(WIDTH):
            off = k - (WIDTH - 1) + SHIFT
            q = t + off  # input row, relative to the sequence start
            m = ((q >= 0) & (t < seqlen))[:, None] & md[None, :]
            xv = tl.load(xt + off * stride_xl, mask=m, other=0.0)
            if HAS_H0:
                if pid_l * BLOCK_L + off < 0:  # rows before the start (first tile only): H0[s, d, q + W-1]
                    mh = ((q < 0) & (t < seqlen))[:, None] & md[None, :]
                    hv = tl.load(H0 + pid_s.to(tl.int64) * stride_hb + d[None, :] * stride_hd
                                 + (q + (WIDTH - 1))[:, None] * stride_hw, mask=mh, other=0.0)
                    xv = tl.where(mh, hv, xv)
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


def _conv_fwd(xin, weight, bias, geo, shift, silu, out_dtype, h0=None):
    """Launch the forward kernel: ``xin`` read through its batch and row strides (channel stride
    1); ``h0`` (``(nseq, dim, W-1)`` in ``xin``'s dtype, any strides), when given, supplies the
    rows before the start (then ``shift`` must be 0). Returns ``y`` contiguous
    ``(batch, L_out, dim)``."""
    fwd, _, _ = _get_kernels()
    y = torch.empty(xin.shape[0], geo.L_out, geo.dim, device=xin.device, dtype=out_dtype)
    hs = h0.stride() if h0 is not None else (0, 0, 0)
    grid = (geo.nseq, geo.n_lblocks, geo.n_dblocks)
    fwd[grid](xin, weight, bias, y, h0, geo.cu_in, geo.cu_out, geo.L_out, geo.dim,
              xin.stride(0), xin.stride(1), *hs,
              WIDTH=weight.shape[1], SHIFT=shift, HAS_BIAS=bias is not None, SILU=silu,
              HAS_H0=h0 is not None, IS_VARLEN=geo.varlen, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
              num_warps=4)
    return y


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xin, weight, bias, geo, shift, silu, out_dtype):
        y = _conv_fwd(xin, weight, bias, geo, shift, silu, out_dtype)
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


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _forward_nocopy(x, weight, bias, silu, initial_state, return_final_state):
    """No-autograd, non-varlen forward without the full-size copies: ``x`` is read through its
    strides (copied only if its channel stride is not 1) and the rows before the start come from
    ``initial_state`` in the kernel. The final state is the same (batch, dim, W-1) transposed view
    in ``x.dtype`` as :func:`_final_state` gives on the padded path."""
    bsz, L, dim = x.shape
    W = weight.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # the state in x's dtype (rounded in torch, as the padded path does; a no-op when it matches)
    h0 = initial_state.to(x.dtype) if (initial_state is not None and W > 1) else None
    geo = _Geo(x, L, None, None, bsz, L, L)
    y = _conv_fwd(x, weight, bias, geo, 0, silu, x.dtype, h0=h0)
    if not return_final_state:
        return y
    if W == 1:
        return y, x.new_zeros(bsz, dim, 0)
    if L >= W - 1:
        f = x[:, L - (W - 1):].transpose(1, 2)
        # A view of x. Where it is already contiguous (batch 1 and W == 2), a caller's
        # .contiguous() would return x's own memory, which the ssmkit::causal_conv1d custom op
        # may not return (no output may alias an input): copy those W-1 rows.
        return y, (f.clone() if f.is_contiguous() else f)
    if h0 is not None:  # (batch, W-1-L, dim) tail of the initial state, then x
        head = h0[:, :, L:].transpose(1, 2)
    else:
        head = x.new_zeros(bsz, W - 1 - L, dim)
    return y, torch.cat([head, x], 1).transpose(1, 2)


@register("causal_conv1d", "triton")
def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None,
                         return_final_state=False, cu_seqlens=None):
    """Triton causal depthwise conv1d; see the module docstring. Inputs assumed validated."""
    bsz, L, dim = x.shape
    W = weight.shape[1]
    silu = activation in ("silu", "swish")
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    varlen = cu_seqlens is not None
    if not varlen and not _needs_grad(x, weight, bias, initial_state):
        return _forward_nocopy(x, weight, bias, silu, initial_state, return_final_state)
    x = x.contiguous()
    shift = 0
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
