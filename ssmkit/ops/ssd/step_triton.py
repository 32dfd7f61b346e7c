"""``backend="triton"`` form of :func:`ssmkit.ops.ssd_step`: SSD decoding in one launch.

Same signature as the reference form (:func:`ssmkit.ops.ssd.step.ssd_step_reference`)::

    ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=(0.0, inf), state_batch_indices=None)

``state: (pool, H, P, N)`` float32 (float64 for float64 tests), contiguous, updated in place;
``x, z: (batch, T, H, P)``, ``dt: (batch, T, H)``, ``B, C: (batch, T, G, N)``, all read through
their strides (slices of the layer's projection need no copy); ``A, dt_bias: (H,)``, ``D: (H,)``
or ``(H, P)``. Without ``state_batch_indices`` the pool is the batch (``pool == batch``); with it,
row ``b`` reads and writes pool row ``state_batch_indices[b]``, and a negative index marks a
padding row: its output is zero and no state is touched.

One program owns a ``(BLOCK_P, N)`` block of one head's state of one batch row: it loads it once,
runs the ``T`` tokens on it in registers (Δ = clamp(softplus(dt + dt_bias)), h <- exp(ΔA) h +
Δ x Bᵀ, y = h C + D x, y * silu(z)) and stores it once. No host synchronisation and no
allocation but ``y``, so a decode step built on it can be captured in a CUDA graph. The kernel
compiles on first use; this module imports without Triton.
"""

from __future__ import annotations

import functools
import math

import torch

from ssmkit.ops.dispatch import register

__all__ = ["ssd_step_triton"]

# State elements per program (BLOCK_P x BLOCK_N) and warps: 2048 float32 over 4 warps is 16
# registers of state per thread; at H32 P64 N128 batch 1 that is 128 programs.
SSD_STEP = {"elems": 2048, "num_warps": 4}


@functools.cache
def _kernel():
    """The kernel, defined (and Triton imported) on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def ssd_step_kernel(STATE, X, DT, A, B, C, D, Z, DT_BIAS, SBI, Y,
                        T, P, N, heads_per_group, dt_min, dt_max,
                        ss_b, ss_h, sx_b, sx_t, sx_h, sdt_b, sdt_t, sdt_h,
                        sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sz_b, sz_t, sz_h, sy_b, sy_t, sy_h,
                        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_SBI: tl.constexpr, SOFTPLUS: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        ACC = STATE.dtype.element_ty
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = tl.program_id(1).to(tl.int64)
        h = tl.program_id(2).to(tl.int64)
        grp = h // heads_per_group
        n = tl.arange(0, BLOCK_N)
        if HAS_SBI:
            row = tl.load(SBI + b).to(tl.int64)
        else:
            row = b
        # a padding row (negative index) stores zeros and touches no state: its state mask is
        # empty (written as a bound on p: a scalar condition does not combine with a block mask
        # in the interpreter)
        mp = p < P
        ms = p < tl.where(row >= 0, P, 0)
        mn = n < N
        m2 = ms[:, None] & mn[None, :]
        s_ptr = STATE + tl.maximum(row, 0) * ss_b + h * ss_h + p[:, None] * N + n[None, :]
        st = tl.load(s_ptr, mask=m2, other=0.0).to(ACC)
        Av = tl.load(A + h).to(ACC)
        if HAS_BIAS:
            bias = tl.load(DT_BIAS + h).to(ACC)
        if HAS_D:
            if D_PER_CHANNEL:
                Dv = tl.load(D + h * P + p, mask=mp, other=0.0).to(ACC)
            else:
                Dv = tl.load(D + h).to(ACC)
        for t in range(0, T):
            dt = tl.load(DT + b * sdt_b + t * sdt_t + h * sdt_h).to(ACC)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
            x = tl.load(X + b * sx_b + t * sx_t + h * sx_h + p, mask=mp, other=0.0).to(ACC)
            Bt = tl.load(B + b * sb_b + t * sb_t + grp * sb_g + n, mask=mn, other=0.0).to(ACC)
            Ct = tl.load(C + b * sc_b + t * sc_t + grp * sc_g + n, mask=mn, other=0.0).to(ACC)
            st = tl.exp(dt * Av) * st + (dt * x)[:, None] * Bt[None, :]
            y = tl.sum(st * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                zt = tl.load(Z + b * sz_b + t * sz_t + h * sz_h + p, mask=mp, other=0.0).to(ACC)
                y = y * zt * tl.sigmoid(zt)
            y = tl.where(ms, y, 0.0)
            tl.store(Y + b * sy_b + t * sy_t + h * sy_h + p, y.to(Y.dtype.element_ty), mask=mp)
        tl.store(s_ptr, st.to(STATE.dtype.element_ty), mask=m2)

    return ssd_step_kernel


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dimension has unit stride, else a contiguous copy."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _limits(dt_limit) -> tuple[float, float]:
    """The Δ clamp as the kernel takes it (finite bounds; no clamp when none is set)."""
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if lo > 0.0 or hi != math.inf:
        return lo, min(hi, 3.0e38)
    return -3.0e38, 3.0e38


def ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=(0.0, math.inf), state_batch_indices=None):
    """Triton form of ``ssd_step`` (T tokens, no validation; see the module docstring)."""
    if state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor for the Triton step, got "
                         f"{state.dtype}{'' if state.is_contiguous() else ', not contiguous'}")
    bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, B, C, z = (_unit_last(t) for t in (x, B, C, z))
    y = torch.empty(bsz, T, H, P, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    BLOCK_N = max(2, 1 << (N - 1).bit_length())
    BLOCK_P = max(2, min(1 << (P - 1).bit_length(), SSD_STEP["elems"] // BLOCK_N))
    zs = (z.stride(0), z.stride(1), z.stride(2)) if z is not None else (0, 0, 0)
    sbi = state_batch_indices
    lo, hi = _limits(dt_limit)
    _kernel()[(-(-P // BLOCK_P), bsz, H)](
        state, x, dt, A.contiguous(), B, C, None if D is None else D.contiguous(), z,
        None if dt_bias is None else dt_bias.contiguous(), sbi, y,
        T, P, N, H // G, lo, hi,
        state.stride(0), state.stride(1), x.stride(0), x.stride(1), x.stride(2),
        dt.stride(0), dt.stride(1), dt.stride(2), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), *zs, y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, HAS_SBI=sbi is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=SSD_STEP["num_warps"])
    return y


# Not yet run on a GPU: asked for by name (backend="triton") until the GPU tests pass.
register("ssd_step", "triton", auto=False)(ssd_step_triton)
