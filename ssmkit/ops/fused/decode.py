"""Triton decode kernels for Mamba: one launch per op per step, states updated in place.

* :func:`causal_conv1d_step_triton` ``(x, conv_state, weight, bias=None, activation=None)``:
  the ``("causal_conv1d_step", "triton")`` form. Shifts the ``(batch, dim, W-1)`` conv state by
  the new token(s) and returns the convolution (+ bias, + SiLU) of each, fused in one kernel.
  ``x``: ``(batch, dim)`` or ``(batch, T, dim)``, any strides with unit stride along ``dim`` (e.g.
  the x half of ``in_proj``'s output, read in place); ``conv_state`` may have any strides.
  Arithmetic in float32 (float64 when an input is float64).
* :func:`selective_scan_step_triton` ``(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
  dt_proj_weight=None)``: the ``("selective_scan_step", "triton")`` form. ``state``:
  ``(batch, dim, N)`` float32; ``x, dt, z``: ``(batch, T, dim)``; ``B, C``: ``(batch, T, G, N)``,
  all read through their strides (slices of one projection need no copy). For each token, fused:
  Δ = softplus(dt + dt_bias), h = exp(ΔA) h + Δ B x, y = (C·h + D x) · silu(z). With
  ``dt_proj_weight (dim, R)``, ``dt`` is the low-rank ``(batch, T, R)`` input and the kernel also
  does Mamba's dt_proj: dt = dt_proj_weight · dt (rounded to the model dtype, as the unfused
  ``F.linear`` is), so a Mamba decode step needs no separate dt_proj GEMV.

The state is read once, kept in registers over the ``T`` tokens and written once.

For the batch-1 Mamba step (:meth:`ssmkit.layers.mamba.Mamba.step_norm`), two more ops, each
with a PyTorch ``"reference"`` form of the same signature:

* ``causal_conv1d_step_proj(x, conv_state, weight, bias, activation, proj_weight)`` -> ``(xs,
  parts)``: one token's conv update + SiLU, then ``x_proj`` split over channel blocks: ``parts
  (P, batch, R + 2N)`` float32 with ``Σ_p parts[p] = xs @ proj_weight.T`` (no atomics: the
  consumer sums them in a fixed order, so results are reproducible);
* ``selective_scan_step_parts(state, x, parts, A, D, z, dt_bias, dt_proj_weight)`` -> ``y``:
  sums the parts into ``[dt_low | B | C]`` (rounded to the model dtype, as x_proj's output is),
  then dt_proj, softplus, the state update, ``D x`` and the gate (one group).

Their kernels use programmatic dependent launch on Hopper
(:func:`ssmkit.ops.dispatch.programmatic_launch`): weights are loaded before
``griddepcontrol.wait``, everything the previous kernel writes after it. No kernel here takes a
host synchronisation, and each allocates only its outputs, so a decode step built from them can
be captured in a CUDA graph (:mod:`ssmkit.inference.cuda_graph`). Imports without Triton;
kernels compile on first use.
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops.dispatch import launch_options, programmatic_launch

__all__ = ["causal_conv1d_step_triton", "selective_scan_step_triton"]

# Launch shapes (module-level so a GPU sweep can change them without editing code). Fused dt_proj:
# (BLOCK_D channels x BLOCK_R of dt_rank) weight tiles over 4 warps, ~55-72 registers on sm_90, no
# spills; up to ``max_rows`` batch rows per program (see _rows_per_program).
SSU_FUSED = {"block_d": 32, "num_warps": 4, "max_rows": 4}
SSU_PLAIN = {"block_d": 32, "num_warps": 1}
CONV_UPDATE = {"block_d": 128, "num_warps": 4}

@functools.cache
def _kernels():
    """The kernels, defined (and Triton imported) on first use."""
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def conv_update_kernel(X, STATE, W_, BIAS, Y, T, dim, sx_b, sx_t, ss_b, ss_d, ss_w, sy_b, sy_t,
                           WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                           USE_F64: tl.constexpr, BLOCK_D: tl.constexpr):
        ACC = tl.float64 if USE_F64 else tl.float32  # float32 arithmetic (float64 for tests)
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        st_base = STATE + b * ss_b + d * ss_d
        x_base = X + b * sx_b + d
        # the old state (oldest first), read once into registers before it is overwritten
        win = ()
        for j in tl.static_range(WIDTH - 1):
            win = win + (tl.load(st_base + j * ss_w, mask=md, other=0.0).to(ACC),)
        wts = ()
        for k in tl.static_range(WIDTH):
            wts = wts + (tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(ACC),)
        if HAS_BIAS:
            bias = tl.load(BIAS + d, mask=md, other=0.0).to(ACC)
        for t in range(0, T):
            acc = tl.zeros([BLOCK_D], dtype=ACC)
            for k in tl.static_range(WIDTH):
                p = t - (WIDTH - 1) + k  # input position; < 0 reads the old state
                v = tl.load(x_base + p * sx_t, mask=d < tl.where(p >= 0, dim, 0), other=0.0).to(ACC)
                for j in tl.static_range(WIDTH - 1):
                    v = tl.where(p == j - (WIDTH - 1), win[j], v)
                acc += wts[k] * v
            if HAS_BIAS:
                acc += bias
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(Y + b * sy_b + t * sy_t + d, acc.to(Y.dtype.element_ty), mask=md)
        # new state: the last W-1 inputs of [old state, x_0 .. x_{T-1}] (all reads done above)
        for j in tl.static_range(WIDTH - 1):
            p = T - (WIDTH - 1) + j
            v = tl.load(x_base + p * sx_t, mask=d < tl.where(p >= 0, dim, 0), other=0.0).to(ACC)
            for i in tl.static_range(WIDTH - 1):
                v = tl.where(p == i - (WIDTH - 1), win[i], v)
            tl.store(st_base + j * ss_w, v.to(STATE.dtype.element_ty), mask=md)

    @triton.jit
    def ssm_update_kernel(STATE, X, DT, A, B, C, D, Z, DT_BIAS, WDT, Y,
                          batch, T, dim, dstate, dpg, R,
                          ss_b, ss_d, sx_b, sx_t, sdt_b, sdt_t, sz_b, sz_t,
                          sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sy_b, sy_t, sw_d,
                          HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SOFTPLUS: tl.constexpr, DT_PROJ: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        ACC = STATE.dtype.element_ty
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md = d < dim
        mn = n < dstate
        # (BLOCK_N, BLOCK_D) tiles: a channel's N states along axis 0
        Av = tl.load(A + d[None, :] * dstate + n[:, None], mask=mn[:, None] & md[None, :], other=0.0).to(ACC)
        g = d // dpg  # group of each channel
        if HAS_D:
            Dv = tl.load(D + d, mask=md, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(DT_BIAS + d, mask=md, other=0.0).to(ACC)
        r = tl.arange(0, BLOCK_R)
        # ROWS batch rows per program: at large batch the dt_proj weight block is read from
        # global memory once per program and from L1 for the other rows.
        for i in range(0, ROWS):
            b = (tl.program_id(1) * ROWS + i).to(tl.int64)
            mrow = d < tl.where(b < batch, dim, 0)  # channels of a real row (not md & ...:
            # a scalar comparison does not combine with a block mask in the interpreter)
            m2 = mn[:, None] & mrow[None, :]
            s_ptr = STATE + b * ss_b + d[None, :] * ss_d + n[:, None]
            h = tl.load(s_ptr, mask=m2, other=0.0).to(ACC)
            for t in range(0, T):
                x = tl.load(X + b * sx_b + t * sx_t + d, mask=mrow, other=0.0).to(ACC)
                if DT_PROJ:
                    # dt = W_dt · dt_low over R in chunks of BLOCK_R (R = dt_rank, e.g. 128)
                    acc = tl.zeros([BLOCK_D], dtype=ACC)
                    for r0 in range(0, R, BLOCK_R):
                        mr = (r0 + r) < R
                        lo = tl.load(DT + b * sdt_b + t * sdt_t + r0 + r,
                                     mask=(r0 + r) < tl.where(b < batch, R, 0), other=0.0).to(ACC)
                        w = tl.load(WDT + d[:, None] * sw_d + (r0 + r)[None, :],
                                    mask=md[:, None] & mr[None, :], other=0.0).to(ACC)
                        acc += tl.sum(w * lo[None, :], axis=1)
                    # round like the unfused F.linear in the model dtype
                    dt = acc.to(X.dtype.element_ty).to(ACC)
                else:
                    dt = tl.load(DT + b * sdt_b + t * sdt_t + d, mask=mrow, other=0.0).to(ACC)
                if HAS_BIAS:
                    dt += bias
                if SOFTPLUS:
                    dt = tl.where(dt > 20.0, dt, tl.where(dt < -15.0, tl.exp(dt), tl.log(1.0 + tl.exp(dt))))
                Bt = tl.load(B + b * sb_b + t * sb_t + g[None, :] * sb_g + n[:, None], mask=m2, other=0.0).to(ACC)
                Ct = tl.load(C + b * sc_b + t * sc_t + g[None, :] * sc_g + n[:, None], mask=m2, other=0.0).to(ACC)
                # h = exp(ΔA) h + Δ x B, with exp(v) = exp2(v log2 e)
                h = tl.exp2((dt * 1.4426950408889634)[None, :] * Av) * h + (dt * x)[None, :] * Bt
                y = tl.sum(h * Ct, axis=0)
                if HAS_D:
                    y += Dv * x
                if HAS_Z:
                    z = tl.load(Z + b * sz_b + t * sz_t + d, mask=mrow, other=0.0).to(ACC)
                    y = y * z * tl.sigmoid(z)
                tl.store(Y + b * sy_b + t * sy_t + d, y.to(Y.dtype.element_ty), mask=mrow)
            tl.store(s_ptr, h.to(STATE.dtype.element_ty), mask=m2)

    @triton.jit
    def conv_update_proj_kernel(X, STATE, W_, BIAS, XS, PW, PARTS, batch, dim, n_out,
                                sx_b, ss_b, ss_d, ss_w, sxs_b, spw,
                                WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                                PDL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr):
        # One token: the conv update of BLOCK_D channels (as conv_update_kernel), then their share
        # of the projection that follows it, PARTS[pid_d, b, o] = Σ_{d in block} PW[o, d] xs[d]
        # (Mamba's x_proj, split over the channel blocks; the consumer sums the parts).
        if PDL:  # let the next kernel start loading its weights (it waits for our results)
            gdc_launch_dependents()
        b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = d < dim
        o = tl.arange(0, BLOCK_O)
        # Weights first: with programmatic dependent launch they load while the kernel before
        # (which produces x) is still running.
        wts = ()
        for k in tl.static_range(WIDTH):
            wts = wts + (tl.load(W_ + d * WIDTH + k, mask=md, other=0.0).to(tl.float32),)
        if HAS_BIAS:
            bias = tl.load(BIAS + d, mask=md, other=0.0).to(tl.float32)
        w0 = tl.load(PW + o[:, None] * spw + d[None, :], mask=(o < n_out)[:, None] & md[None, :],
                     other=0.0)
        if PDL:
            gdc_wait()
        st_base = STATE + b * ss_b + d * ss_d
        x_new = tl.load(X + b * sx_b + d, mask=md, other=0.0)
        acc = wts[WIDTH - 1] * x_new.to(tl.float32)
        for j in tl.static_range(WIDTH - 1):
            v = tl.load(st_base + j * ss_w, mask=md, other=0.0)
            acc += wts[j] * v.to(tl.float32)
            # shift: slot j takes slot j + 1 and the newest slot takes the token (a thread reads
            # its own channel's slots before it writes them)
            if j > 0:
                tl.store(st_base + (j - 1) * ss_w, v, mask=md)
        if WIDTH > 1:
            tl.store(st_base + (WIDTH - 2) * ss_w, x_new.to(STATE.dtype.element_ty), mask=md)
        if HAS_BIAS:
            acc += bias
        if SILU:
            acc = acc * tl.sigmoid(acc)
        xs = acc.to(XS.dtype.element_ty)
        tl.store(XS + b * sxs_b + d, xs, mask=md)
        xs = tl.where(md, xs.to(tl.float32), 0.0)
        part = PARTS + (pid_d * batch + b) * n_out
        tl.store(part + o, tl.sum(w0.to(tl.float32) * xs[None, :], axis=1), mask=o < n_out)
        for o0 in range(BLOCK_O, n_out, BLOCK_O):
            mo = (o0 + o) < n_out
            w = tl.load(PW + (o0 + o)[:, None] * spw + d[None, :], mask=mo[:, None] & md[None, :],
                        other=0.0)
            tl.store(part + o0 + o, tl.sum(w.to(tl.float32) * xs[None, :], axis=1), mask=mo)

    @triton.jit
    def ssm_step_parts_kernel(STATE, X, PARTS, A, D, Z, DT_BIAS, WDT, Y, batch, dim, dstate, R,
                              nparts, n_out, ss_b, ss_d, sx_b, sz_b, sy_b, sw_d,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                              PDL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        # One token of Mamba's state update (one group) from x_proj's parts:
        # [dt_low | B | C] = Σ_p PARTS[p, b] (rounded to the model dtype, as x_proj's output),
        # Δ = softplus(W_dt · dt_low + bias), h = exp(ΔA) h + Δ x B, y = (C·h + D x) silu(z).
        if PDL:
            gdc_launch_dependents()
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        b = tl.program_id(1).to(tl.int64)
        n = tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        pp = tl.arange(0, BLOCK_P)
        md = d < dim
        mn = n < dstate
        mr = r < R
        # constants first (loaded while the kernel before finishes, under PDL)
        Av = tl.load(A + d[None, :] * dstate + n[:, None], mask=mn[:, None] & md[None, :], other=0.0)
        w = tl.load(WDT + d[:, None] * sw_d + r[None, :], mask=md[:, None] & mr[None, :], other=0.0)
        if HAS_D:
            Dv = tl.load(D + d, mask=md, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(DT_BIAS + d, mask=md, other=0.0).to(tl.float32)
        if PDL:
            gdc_wait()
        row = PARTS + b * n_out
        s_part = batch * n_out
        mp = pp < nparts
        lo = tl.sum(tl.load(row + pp[:, None] * s_part + r[None, :], mask=mp[:, None] & mr[None, :],
                            other=0.0), axis=0)
        lo = lo.to(X.dtype.element_ty).to(tl.float32)
        mpn = mp[:, None] & mn[None, :]
        Bv = tl.sum(tl.load(row + pp[:, None] * s_part + R + n[None, :], mask=mpn, other=0.0), axis=0)
        Cv = tl.sum(tl.load(row + pp[:, None] * s_part + R + dstate + n[None, :], mask=mpn, other=0.0),
                    axis=0)
        Bv = Bv.to(X.dtype.element_ty).to(tl.float32)
        Cv = Cv.to(X.dtype.element_ty).to(tl.float32)
        # dt_proj, rounded like the unfused F.linear in the model dtype
        dt = tl.sum(w.to(tl.float32) * lo[None, :], axis=1).to(X.dtype.element_ty).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        dt = tl.where(dt > 20.0, dt, tl.where(dt < -15.0, tl.exp(dt), tl.log(1.0 + tl.exp(dt))))
        x = tl.load(X + b * sx_b + d, mask=md, other=0.0).to(tl.float32)
        s_ptr = STATE + b * ss_b + d[None, :] * ss_d + n[:, None]
        m2 = mn[:, None] & md[None, :]
        h = tl.load(s_ptr, mask=m2, other=0.0)
        # h = exp(ΔA) h + Δ x B  (exp(v) = exp2(v log2 e))
        h = tl.exp2((dt * 1.4426950408889634)[None, :] * Av) * h + (dt * x)[None, :] * Bv[:, None]
        y = tl.sum(h * Cv[:, None], axis=0)
        if HAS_D:
            y += Dv * x
        if HAS_Z:
            z = tl.load(Z + b * sz_b + d, mask=md, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + b * sy_b + d, y.to(Y.dtype.element_ty), mask=md)
        tl.store(s_ptr, h, mask=m2)

    return conv_update_kernel, ssm_update_kernel, conv_update_proj_kernel, ssm_step_parts_kernel


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride, else a contiguous copy."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def causal_conv1d_step_triton(x, conv_state, weight, bias=None, activation=None):
    """The ``"triton"`` form of the op ``"causal_conv1d_step"`` (no validation; the registered forms
    take ``x`` first): ``conv_state (batch, dim, W-1)`` updated in place (any strides); ``x (batch, [T,] dim)`` read
    through its strides. Returns ``y`` of the shape of ``x``, contiguous, in ``x``'s dtype."""
    conv_k = _kernels()[0]
    single = x.dim() == 2
    x3 = _unit_last(x.unsqueeze(1) if single else x)
    bsz, T, dim = x3.shape
    W = weight.shape[1]
    y = torch.empty(bsz, T, dim, device=x.device, dtype=x.dtype)
    BLOCK_D = CONV_UPDATE["block_d"]
    conv_k[(bsz, triton_cdiv(dim, BLOCK_D))](
        x3, conv_state, weight.contiguous(), bias, y, T, dim, x3.stride(0), x3.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2) if W > 1 else 1, y.stride(0),
        y.stride(1), WIDTH=W, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
        USE_F64=torch.float64 in (x.dtype, conv_state.dtype, weight.dtype), BLOCK_D=BLOCK_D,
        num_warps=CONV_UPDATE["num_warps"])
    return y.squeeze(1) if single else y


def _rows_per_program(batch: int, fused_dt: bool) -> int:
    """Batch rows per program: 1 at small batch (most programs for latency); up to 4 at large
    batch so the dt_proj weight block is reused from L1 (grids stay >= ~2K programs)."""
    if not fused_dt:
        return 1
    return max(1, min(SSU_FUSED["max_rows"], batch // 8))


def selective_scan_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False, dt_proj_weight=None):
    """Triton form of ``selective_scan_step`` (shapes normalised by the public function:
    ``x, dt, z`` ``(batch, T, dim)``, ``B, C`` ``(batch, T, G, N)``; any strides with a unit last
    stride are read in place). ``state (batch, dim, N)`` needs a unit stride along ``N``.

    ``dt_proj_weight (dim, R)``: ``dt`` is then ``(batch, T, R)`` and Δ's pre-activation is
    ``dt_proj_weight · dt`` (Mamba's dt_proj, fused). Returns ``y (batch, T, dim)`` in ``x``'s dtype.
    """
    ssm_k = _kernels()[1]
    if state.stride(2) != 1:
        raise ValueError("state must have unit stride along N for the in-place Triton update")
    bsz, T, dim = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, B, C = (_unit_last(t) for t in (x, dt, B, C))
    z = _unit_last(z) if z is not None else None
    fused = dt_proj_weight is not None
    if fused:
        w = _unit_last(dt_proj_weight)
        R = w.shape[1]
        BLOCK_R = min(64, max(16, 1 << (R - 1).bit_length()))
    else:
        w, R, BLOCK_R = dt, 1, 16  # unused
    y = torch.empty(bsz, T, dim, device=x.device, dtype=x.dtype)
    rows = _rows_per_program(bsz, fused)
    cfg = SSU_FUSED if fused else SSU_PLAIN
    BLOCK_D, warps = cfg["block_d"], cfg["num_warps"]
    BLOCK_N = max(2, 1 << (N - 1).bit_length())
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    ssm_k[(triton_cdiv(dim, BLOCK_D), triton_cdiv(bsz, rows))](
        state, x, dt, A.contiguous(), B, C, D, z, dt_bias, w, y,
        bsz, T, dim, N, dim // G, R,
        state.stride(0), state.stride(1), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        zs[0], zs[1], B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), w.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), DT_PROJ=fused, ROWS=rows, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        BLOCK_R=BLOCK_R, num_warps=warps)
    return y


# Mamba.step asks for this: the Triton form takes dt_proj_weight (fuses dt_proj).
selective_scan_step_triton.fuses_dt_proj = True


# -- the Mamba decode step at small batch: conv update + x_proj, then the state update ----------
# Conv update and x_proj in one launch: each program convolves BLOCK_D channels of the token and
# writes its share of x_proj (BLOCK_O outputs at a time); the state update sums the shares.
# H100, batch 1, whole Mamba-1.4B step with PDL: 64 channels 1.824 ms, 128 1.814, 256 1.784.
CONV_PROJ = {"block_d": 256, "block_o": 32, "num_warps": 4}
SSU_PARTS = {"block_d": 32, "num_warps": 4}


def causal_conv1d_step_proj_reference(x, conv_state, weight, bias, activation, proj_weight):
    """One token through the conv update, then a projection: ``x (batch, dim)`` ->
    ``(xs (batch, dim), parts (P, batch, n_out) float32)`` with ``Σ_p parts[p] = xs @ proj_weight.T``
    (``P = 1`` here; the Triton form splits the sum over channel blocks). ``conv_state`` is
    updated in place."""
    from ssmkit.ops.conv.causal_conv1d import conv_update_unchecked

    xs = conv_update_unchecked(x.unsqueeze(1), conv_state, weight, bias, activation).squeeze(1)
    return xs, torch.nn.functional.linear(xs, proj_weight).float().unsqueeze(0)


def causal_conv1d_step_proj_triton(x, conv_state, weight, bias, activation, proj_weight):
    """Triton form of ``causal_conv1d_step_proj`` (same contract, no validation): ``x`` and
    ``proj_weight`` need a unit last stride, ``conv_state`` any strides."""
    k = _kernels()[2]
    bsz, dim = x.shape
    W = weight.shape[1]
    n_out = proj_weight.shape[0]
    x, pw = _unit_last(x), _unit_last(proj_weight)
    bd = CONV_PROJ["block_d"]
    nblk = triton_cdiv(dim, bd)
    xs = torch.empty(bsz, dim, device=x.device, dtype=x.dtype)
    parts = torch.empty(nblk, bsz, n_out, device=x.device, dtype=torch.float32)
    pdl = programmatic_launch(x)
    k[(bsz, nblk)](x, conv_state, weight.contiguous(), bias, xs, pw, parts, bsz, dim, n_out,
                   x.stride(0), conv_state.stride(0), conv_state.stride(1),
                   conv_state.stride(2) if W > 1 else 1, xs.stride(0), pw.stride(0),
                   WIDTH=W, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
                   PDL=pdl, BLOCK_D=bd, BLOCK_O=CONV_PROJ["block_o"],
                   num_warps=CONV_PROJ["num_warps"], **launch_options(pdl))
    return xs, parts


def _split_parts(parts: torch.Tensor, R: int, N: int, dtype: torch.dtype):
    """``parts (P, batch, R + 2N)`` -> ``dt_low, B, C`` summed and rounded to ``dtype``."""
    s = parts.sum(0).to(dtype)
    return s[:, :R], s[:, R:R + N], s[:, R + N:R + 2 * N]


def selective_scan_step_parts_reference(state, x, parts, A, D, z, dt_bias, dt_proj_weight):
    """One token of Mamba's state update from x_proj's split output: ``parts (P, batch, R + 2N)``
    sums to ``[dt_low | B | C]`` (rounded to ``x``'s dtype, as x_proj's output is); Δ's
    pre-activation is ``dt_proj_weight (dim, R) · dt_low`` (+ ``dt_bias``, softplus). ``state
    (batch, dim, N)`` updated in place; ``x, z (batch, dim)``; returns ``y (batch, dim)``."""
    from ssmkit.ops.selective_scan.step import selective_scan_step_reference

    R, N = dt_proj_weight.shape[1], state.shape[2]
    dt_low, B, C = _split_parts(parts, R, N, x.dtype)
    dt = torch.nn.functional.linear(dt_low, dt_proj_weight)
    y = selective_scan_step_reference(state, x.unsqueeze(1), dt.unsqueeze(1), A,
                                    B[:, None, None], C[:, None, None], D,
                                    None if z is None else z.unsqueeze(1), dt_bias, True)
    return y.squeeze(1)


def selective_scan_step_parts_triton(state, x, parts, A, D, z, dt_bias, dt_proj_weight):
    """Triton form of ``selective_scan_step_parts`` (same contract, no validation)."""
    k = _kernels()[3]
    if state.stride(2) != 1:
        raise ValueError("state must have unit stride along N for the in-place Triton update")
    bsz, dim = x.shape
    N = state.shape[2]
    x = _unit_last(x)
    z = _unit_last(z) if z is not None else None
    w = _unit_last(dt_proj_weight)
    R = w.shape[1]
    P, _, n_out = parts.shape
    parts = parts.contiguous()
    y = torch.empty(bsz, dim, device=x.device, dtype=x.dtype)
    BLOCK_D, warps = SSU_PARTS["block_d"], SSU_PARTS["num_warps"]
    pdl = programmatic_launch(x)
    k[(triton_cdiv(dim, BLOCK_D), bsz)](
        state, x, parts, A.contiguous(), D, z, dt_bias, w, y, bsz, dim, N, R, P, n_out,
        state.stride(0), state.stride(1), x.stride(0), z.stride(0) if z is not None else 0,
        y.stride(0), w.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, PDL=pdl,
        BLOCK_D=BLOCK_D, BLOCK_N=max(2, 1 << (N - 1).bit_length()),
        BLOCK_R=max(2, 1 << (R - 1).bit_length()), BLOCK_P=max(2, 1 << (P - 1).bit_length()),
        num_warps=warps, **launch_options(pdl))
    return y
