"""Triton decode kernels for Mamba: one launch per op per step, states updated in place.

* :func:`causal_conv1d_update_triton` ``(x, conv_state, weight, bias=None, activation=None)``:
  shifts the ``(batch, dim, W-1)`` conv state by the new token(s) and returns the convolution
  (+ bias, + SiLU) of each, fused in one kernel. ``x``: ``(batch, dim)`` or ``(batch, T, dim)``.
* :func:`selective_state_update_triton` ``(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)``:
  the ``("selective_state_update", "triton")`` form. ``state``: ``(batch, dim, N)`` float32;
  ``x, dt, z``: ``(batch, T, dim)``; ``B, C``: ``(batch, T, G, N)``. For each token, fused:
  Δ = softplus(dt + dt_bias), h = exp(ΔA) h + Δ B x, y = (C·h + D x) · silu(z). The state is read
  once, kept in registers over the ``T`` tokens and written once.

Both kernels take no host synchronisation and allocate only their output, so a decode step built
from them can be captured in a CUDA graph (:mod:`ssmkit.inference.cuda_graph`). Imports without
Triton; kernels compile on first use.
"""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register

__all__ = ["causal_conv1d_update_triton", "selective_state_update_triton"]

_K = None


def _kernels():
    global _K
    if _K is None:
        _K = _build()
    return _K


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_update_kernel(X, STATE, W_, BIAS, Y, T, dim,
                           WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        st_base = STATE + (b * dim + d) * (WIDTH - 1)
        # the old state (oldest first), read once into registers before it is overwritten
        win = ()
        for j in tl.static_range(WIDTH - 1):
            win = win + (tl.load(st_base + j, mask=md, other=0.0).to(tl.float32),)
        wts = ()
        for k in tl.static_range(WIDTH):
            wts = wts + (tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(tl.float32),)
        if HAS_BIAS:
            bias = tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)
        for t in range(0, T):
            off = (b * T + t) * dim + d
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(WIDTH):
                p = t - (WIDTH - 1) + k  # input position; < 0 reads the old state
                v = tl.load(X + (b * T + p) * dim + d, mask=d < tl.where(p >= 0, dim, 0), other=0.0).to(tl.float32)
                for j in tl.static_range(WIDTH - 1):
                    v = tl.where(p == j - (WIDTH - 1), win[j], v)
                acc += wts[k] * v
            if HAS_BIAS:
                acc += bias
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(Y + off, acc.to(Y.dtype.element_ty), mask=md)
        # new state: the last W-1 inputs of [old state, x_0 .. x_{T-1}] (all reads done above)
        for j in tl.static_range(WIDTH - 1):
            p = T - (WIDTH - 1) + j
            v = tl.load(X + (b * T + p) * dim + d, mask=d < tl.where(p >= 0, dim, 0), other=0.0).to(tl.float32)
            for i in tl.static_range(WIDTH - 1):
                v = tl.where(p == i - (WIDTH - 1), win[i], v)
            tl.store(st_base + j, v.to(STATE.dtype.element_ty), mask=md)

    @triton.jit
    def ssm_update_kernel(STATE, X, DT, A, B, C, D, Z, DT_BIAS, Y, T, dim, dstate, ngroups,
                          dpg, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        ACC = STATE.dtype.element_ty
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md = d < dim
        mn = n < dstate
        m2 = mn[:, None] & md[None, :]
        # (BLOCK_N, BLOCK_D) tiles: channels across lanes, a channel's N states in one thread
        s_off = (b * dim + d[None, :]) * dstate + n[:, None]
        h = tl.load(STATE + s_off, mask=m2, other=0.0).to(ACC)
        Av = tl.load(A + d[None, :] * dstate + n[:, None], mask=m2, other=0.0).to(ACC)
        g = d // dpg  # group of each channel
        if HAS_D:
            Dv = tl.load(D + d, mask=md, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(DT_BIAS + d, mask=md, other=0.0).to(ACC)
        for t in range(0, T):
            row = b * T + t
            off = row * dim + d
            x = tl.load(X + off, mask=md, other=0.0).to(ACC)
            dt = tl.load(DT + off, mask=md, other=0.0).to(ACC)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.where(dt < -15.0, tl.exp(dt), tl.log(1.0 + tl.exp(dt))))
            bc = (row * ngroups + g[None, :]) * dstate + n[:, None]
            Bt = tl.load(B + bc, mask=m2, other=0.0).to(ACC)
            Ct = tl.load(C + bc, mask=m2, other=0.0).to(ACC)
            # h = exp(ΔA) h + Δ x B, with exp(v) = exp2(v log2 e)
            h = tl.exp2((dt * 1.4426950408889634)[None, :] * Av) * h + (dt * x)[None, :] * Bt
            y = tl.sum(h * Ct, axis=0)
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                z = tl.load(Z + off, mask=md, other=0.0).to(ACC)
                y = y * z * tl.sigmoid(z)
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=md)
        tl.store(STATE + s_off, h, mask=m2)

    return conv_update_kernel, ssm_update_kernel


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """Same contract as :func:`ssmkit.ops.conv.causal_conv1d.causal_conv1d_update` (no validation):
    ``conv_state`` ``(batch, dim, W-1)`` contiguous, updated in place."""
    conv_k, _ = _kernels()
    single = x.dim() == 2
    x3 = (x.unsqueeze(1) if single else x).contiguous()
    bsz, T, dim = x3.shape
    W = weight.shape[1]
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous for the in-place Triton update")
    y = torch.empty_like(x3)
    BLOCK_D = 128
    conv_k[(bsz, triton_cdiv(dim, BLOCK_D))](
        x3, conv_state, weight.contiguous(), bias, y, T, dim, WIDTH=W, HAS_BIAS=bias is not None,
        SILU=activation in ("silu", "swish"), BLOCK_D=BLOCK_D, num_warps=4)
    return y.squeeze(1) if single else y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@register("selective_state_update", "triton")
def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """Triton form of ``selective_state_update`` (shapes normalised by the public function:
    ``x, dt, z`` ``(batch, T, dim)``, ``B, C`` ``(batch, T, G, N)``)."""
    _, ssm_k = _kernels()
    if not state.is_contiguous():
        raise ValueError("state must be contiguous for the in-place Triton update")
    bsz, T, dim = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt = x.contiguous(), dt.contiguous()
    B, C = B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    y = torch.empty_like(x)
    BLOCK_D = 32
    BLOCK_N = max(2, 1 << (N - 1).bit_length())
    ssm_k[(bsz, triton_cdiv(dim, BLOCK_D))](
        state, x, dt, A.contiguous(), B, C, D, z, dt_bias, y, T, dim, N, G, dim // G,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, num_warps=1)
    return y
