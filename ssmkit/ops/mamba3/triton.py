"""``backend="triton"`` forms of :func:`ssmkit.ops.mamba3.mamba3` (the chunked scan's kernels,
forward and backward, in :mod:`triton_chunk`) and of :func:`ssmkit.ops.mamba3.mamba3_step` (the
decode step as one kernel). Both are registered with ``auto=False``: tested against the reference
under ``TRITON_INTERPRET=1`` but not yet timed on a GPU, so ``backend="auto"`` does not pick
them; ask for them with ``backend="triton"`` (or ``dispatch.force_backend("triton")``).

The sequence form: the per-token preprocessing (biases, accumulated angles and rotations, the
MIMO up-projection), the trapezoid weights, the D skip, the gate and the MIMO down-projection are
the chunked form's PyTorch code (cheap elementwise work, differentiated by autograd); the scan
itself, every O(L·chunk) and O(L·P·N) term, is the ``torch.library`` op ``ssmkit::mamba3_scan``
(``torch.compile`` sees one node): three kernel launches forwards, four backwards (see
:mod:`triton_chunk`). The kernels read q, k, v in the compute dtype (float32; float64 for float64
inputs): the rotated, biased q and k are computed values, not inputs. Half-precision inputs run
the matmuls on the tensor cores as 3xTF32 (each operand split into two TF32 parts, three
products: about float32's accuracy; one TF32 product has float16's 10 bits, too few for the
angles' gradients, see README.md); float32 inputs in IEEE float32, float64 in float64. States and
their adjoints are float32 (float64). ``chunk_size`` does not change the result: the kernels use
blocks of :data:`BLOCK_M` rows (tokens x ranks). ``cu_seqlens`` goes through the zero-padded
batch every form uses.

The decode step: one program per (sequence, head) keeps that head's state ``h (P, N)`` in
registers for all T tokens of the call and, per token: advances the angles, rotates q and k,
writes the previous token's pair (β) and this token's (γ) into h after its decay, reads
``y_r = h q_r`` for each rank, and stores the carried (k, v); h is written back once at the end.
The rotation is a gather: coordinate n reads its partner ``pair[n]`` and angle ``angle_of[n]``
(−1: not rotated), built on the host for either rotary layout, so one kernel serves both. The D
skip, the gate and the MIMO down-projection run after the kernel
(:func:`ssmkit.ops.mamba3._common.epilogue`), as in every other form. Computes in the state's
dtype (float32, or float64).
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.mamba3._common import bias_rank, epilogue, make_form, rank_weights, up_project, wrap_angle
from ssmkit.ops.mamba3.chunked import trapezoid_weights

BLOCK_M = 64  # rows (tokens x ranks) per chunk: 64 // R tokens
FWD_WARPS = 4
BWD_WARPS = 8


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def mamba3_step_kernel(
        angle_ptr, h_ptr, kst_ptr, vst_ptr,  # state: (b, H, S), (b, H, P, N), (b, R, H, N), (b, H, P)
        x_ptr, dt_ptr, dA_ptr, trap_ptr, ang_ptr,  # (b, T, H, P), (b, T, H) x3, (b, T, H, S)
        B_ptr, C_ptr,  # (b, T, R, G, N)
        bb_ptr, cb_ptr, mx_ptr,  # (R, H, N), (R, H, N), (R, H, P)
        pair_ptr, aof_ptr,  # (N,) int32
        y_ptr,  # (b, T, R, H, P)
        T, H, G, P, N, S,
        R: tl.constexpr, HAS_BB: tl.constexpr, HAS_CB: tl.constexpr, HAS_MX: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        hh = pid % H
        g = hh // (H // G)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_s = tl.arange(0, BLOCK_S)
        mp, mn, ms = offs_p < P, offs_n < N, offs_s < S
        pair = tl.load(pair_ptr + offs_n, mask=mn, other=0)
        aof = tl.load(aof_ptr + offs_n, mask=mn, other=-1)
        rotated = aof >= 0
        aidx = tl.where(rotated, aof, 0)
        first = offs_n < pair  # the first coordinate of a pair turns by -sin, the second by +sin
        sgn = tl.where(first, -1.0, 1.0)
        hmask = mp[:, None] & mn[None, :]
        h_off = (b * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :]
        h = tl.load(h_ptr + h_off, mask=hmask, other=0.0)
        theta = tl.load(angle_ptr + (b * H + hh) * S + offs_s, mask=ms, other=0.0)
        for t in range(T):
            tok = (b * T + t) * H + hh
            dt = tl.load(dt_ptr + tok)
            dA = tl.load(dA_ptr + tok)
            tr = tl.load(trap_ptr + tok)
            a = tl.load(ang_ptr + tok * S + offs_s, mask=ms, other=0.0)
            tanh_a = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
            theta = theta + tanh_a * (3.141592653589793 * dt)
            lam = 1.0 / (1.0 + tl.exp(-tr))
            alpha = tl.exp(dA)
            beta = (1.0 - lam) * dt * alpha
            gamma = lam * dt
            # each coordinate's angle (0 where it is not rotated), gathered from the S angles
            th_n = tl.sum(tl.where(offs_s[None, :] == aidx[:, None], theta[None, :], 0.0), axis=1)
            th_n = tl.where(rotated, th_n, 0.0)
            cos_n = tl.cos(th_n)
            sin_n = tl.sin(th_n) * sgn
            x = tl.load(x_ptr + tok * P + offs_p, mask=mp, other=0.0)
            vprev = tl.load(vst_ptr + (b * H + hh) * P + offs_p, mask=mp, other=0.0)
            h = h * alpha
            for r in tl.static_range(R):
                kr_off = ((b * R + r) * H + hh) * N + offs_n
                kprev = tl.load(kst_ptr + kr_off, mask=mn, other=0.0)
                bc_off = (((b * T + t) * R + r) * G + g) * N
                kraw = tl.load(B_ptr + bc_off + offs_n, mask=mn, other=0.0)
                kpar = tl.load(B_ptr + bc_off + pair, mask=mn, other=0.0)
                if HAS_BB:
                    kraw += tl.load(bb_ptr + (r * H + hh) * N + offs_n, mask=mn, other=0.0)
                    kpar += tl.load(bb_ptr + (r * H + hh) * N + pair, mask=mn, other=0.0)
                k = kraw * cos_n + kpar * sin_n
                if HAS_MX:
                    mx = tl.load(mx_ptr + (r * H + hh) * P + offs_p, mask=mp, other=0.0)
                    vp = vprev * mx
                    v = x * mx
                else:
                    vp = vprev
                    v = x
                h += beta * vp[:, None] * kprev[None, :] + gamma * v[:, None] * k[None, :]
                tl.store(kst_ptr + kr_off, k, mask=mn)
            # y_r reads the state after every rank's write: a second pass over the ranks
            for r in tl.static_range(R):
                bc_off = (((b * T + t) * R + r) * G + g) * N
                qraw = tl.load(C_ptr + bc_off + offs_n, mask=mn, other=0.0)
                qpar = tl.load(C_ptr + bc_off + pair, mask=mn, other=0.0)
                if HAS_CB:
                    qraw += tl.load(cb_ptr + (r * H + hh) * N + offs_n, mask=mn, other=0.0)
                    qpar += tl.load(cb_ptr + (r * H + hh) * N + pair, mask=mn, other=0.0)
                q = qraw * cos_n + qpar * sin_n
                y = tl.sum(h * q[None, :], axis=1)
                tl.store(y_ptr + (((b * T + t) * R + r) * H + hh) * P + offs_p, y, mask=mp)
            tl.store(vst_ptr + (b * H + hh) * P + offs_p, x, mask=mp)
        tl.store(h_ptr + h_off, h, mask=hmask)
        tl.store(angle_ptr + (b * H + hh) * S + offs_s, theta, mask=ms)

    return mamba3_step_kernel


@functools.lru_cache(maxsize=32)
def _pairs(N: int, S: int, layout: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair[n]`` (n's partner; n itself when not rotated) and ``angle_of[n]`` (−1: not rotated).
    Built (a host-to-device copy) at the first call of a geometry, which a CUDA-graph capture's
    warm-up makes: the captured step reuses them."""
    pair = list(range(N))
    angle_of = [-1] * N
    for j in range(S):
        a, b = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, N // 2 + j)
        pair[a], pair[b] = b, a
        angle_of[a] = angle_of[b] = j
    return (torch.tensor(pair, dtype=torch.int32, device=device),
            torch.tensor(angle_of, dtype=torch.int32, device=device))


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


@register("mamba3_step", "triton", auto=False)
def mamba3_step_triton(state, x, dt, dA, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None,
                       mimo_x=None, mimo_z=None, mimo_o=None, rotary_pairs="interleaved"):
    """Same arguments as the reference step's T-token form (``B, C`` with the rank axis)."""
    sdt = state.ssm.dtype
    b, T, H, P = x.shape
    R, G, N = B.shape[2], B.shape[3], B.shape[4]
    S = angles.shape[-1]
    siso = mimo_x is None
    for name, t in (("angle", state.angle), ("ssm", state.ssm), ("k", state.k), ("v", state.v)):
        if t.dtype != sdt or not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous and of the state's dtype {sdt} for the Triton step")
    xs, dts, dAs, traps, angs, Bs, Cs = (t.to(sdt).contiguous() for t in (x, dt, dA, trap, angles, B, C))
    bb, cb = bias_rank(B_bias, sdt, siso), bias_rank(C_bias, sdt, siso)
    mx, mz, mo = (rank_weights(w, sdt) for w in (mimo_x, mimo_z, mimo_o))
    pair, angle_of = _pairs(N, S, rotary_pairs, x.device)
    y = torch.empty(b, T, R, H, P, device=x.device, dtype=sdt)
    dummy = xs
    _kernel()[(b * H,)](
        state.angle, state.ssm, state.k, state.v, xs, dts, dAs, traps, angs, Bs, Cs,
        dummy if bb is None else bb.contiguous(), dummy if cb is None else cb.contiguous(),
        dummy if mx is None else mx.contiguous(), pair, angle_of, y,
        T, H, G, P, N, S, R=R, HAS_BB=bb is not None, HAS_CB=cb is not None, HAS_MX=mx is not None,
        BLOCK_P=_pow2(P), BLOCK_N=_pow2(N), BLOCK_S=_pow2(S),
    )
    # θ mod 2π after the kernel, as PyTorch ops on the device (exact 2π in float64 too, which a
    # Triton literal, float32, is not): no host read, so the step stays capturable in a CUDA graph
    state.angle.copy_(wrap_angle(state.angle))
    v = up_project(xs, mx)
    return epilogue(y, v, x, D, z, mz, mo, siso, sdt).to(x.dtype)


def _tl(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(q, v):
    b, L, R, H, N = q.shape
    P = v.shape[-1]
    qt = max(BLOCK_M // R, 1)
    return b, L, R, H, N, P, qt, -(-L // qt)


def _consts(cdt, tf32x3, N, P):
    return dict(IEEE=not tf32x3, CDT=_tl(cdt), BLOCK_M=BLOCK_M, BLOCK_N=max(16, _pow2(N)),
                BLOCK_P=max(16, _pow2(P)))


def _states(q, k, v, dA, s, h0, dy, tf32x3):
    """The states entering each chunk ``(b, nc, H, P, N)`` and the final state; with ``dy`` also
    the adjoint of the state leaving each chunk (in place of the chunks' own parts) and the
    initial state's gradient."""
    b, L, R, H, N, P, qt, nc = _geometry(q, v)
    cdt = h0.dtype
    st = torch.empty(b, nc, H, P, N, device=q.device, dtype=cdt)
    tot = torch.empty(b, nc, H, device=q.device, dtype=cdt)
    dst = torch.empty_like(st) if dy is not None else st
    km = _kernels()
    km._m3_states[(b * H * nc,)](q, k, v, dy if dy is not None else v, dA, s, st, tot, dst,
                                 L, H, R, N, P, qt, nc, WITH_DY=dy is not None, **_consts(cdt, tf32x3, N, P),
                                 num_warps=FWD_WARPS)
    return st, tot, dst, _pass(st, tot, h0, reverse=False)


def _pass(io, tot, init, *, reverse):
    """:func:`triton_chunk._m3_pass` over ``io (b, nc, H, P, N)`` from ``init (b, H, P, N)``;
    returns the last value (the final state, or backwards the initial state's gradient)."""
    b, nc, H, P, N = io.shape
    fin = torch.empty_like(init)
    block = min(1024, _pow2(P * N))
    _kernels()._m3_pass[(b * H, -(-(P * N) // block))](io, tot, init, fin, H, P * N, nc, REVERSE=reverse,
                                                       CDT=_tl(io.dtype), BLOCK=block)
    return fin


def _forward(q, k, v, dA, s, gamma, h0, tf32x3):
    """``(q, k, v (b, l, R, H, ·), dA, s, γ (b, l, H), h0 (b, H, P, N)) -> (y (b, l, R, H, P), h_L)``:
    the chunked form's ``_chunk_scan`` as kernels, all contiguous in ``h0``'s dtype; ``tf32x3``:
    matmuls as 3xTF32 on the tensor cores, else IEEE (float32 or float64)."""
    cdt = h0.dtype
    b, L, R, H, N, P, qt, nc = _geometry(q, v)
    st, _, _, hT = _states(q, k, v, dA, s, h0, None, tf32x3)
    y = torch.empty(b, L, R, H, P, device=q.device, dtype=cdt)
    _kernels()._m3_out[(b * H * nc,)](q, k, v, dA, s, gamma, st, y, L, H, R, N, P, qt, nc,
                                      **_consts(cdt, tf32x3, N, P), num_warps=FWD_WARPS)
    return y, hT


def _backward(dy, dhT, q, k, v, dA, s, gamma, h0, tf32x3):
    """Gradients of :func:`_forward`'s seven tensor inputs: the states entering the chunks
    recomputed, the adjoint passed backwards over the chunks, then the chunks in parallel."""
    cdt = h0.dtype
    b, L, R, H, N, P, qt, nc = _geometry(q, v)
    st, tot, dso, _ = _states(q, k, v, dA, s, h0, dy, tf32x3)
    dh0 = _pass(dso, tot, dhT, reverse=True)
    dq = torch.empty(q.shape, device=q.device, dtype=cdt)
    dk = torch.empty_like(dq)
    dv = torch.empty(v.shape, device=q.device, dtype=cdt)
    ddA = torch.empty_like(dA)
    ds = torch.empty(b, L, R, H, device=q.device, dtype=cdt)
    dg = torch.empty_like(ds)
    _kernels()._m3_bwd[(b * H * nc,)](q, k, v, dy, dA, s, gamma, st, dso, dq, dk, dv, ddA, ds, dg,
                                      L, H, R, N, P, qt, nc, **_consts(cdt, tf32x3, N, P), num_warps=BWD_WARPS)
    return [dq, dk, dv, ddA, ds.sum(2), dg.sum(2), dh0]


# The scan as torch.library ops (torch.compile sees one node for it, and traces the PyTorch
# pre- and post-processing around it); the backward op runs the backward kernels.
@torch.library.custom_op("ssmkit::mamba3_scan", mutates_args=())
def _scan_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dA: torch.Tensor, s: torch.Tensor,
             gamma: torch.Tensor, h0: torch.Tensor, tf32x3: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, dA, s, gamma, h0, tf32x3)


@_scan_op.register_fake
def _(q, k, v, dA, s, gamma, h0, tf32x3):
    b, L, R, H, _ = q.shape
    return h0.new_empty(b, L, R, H, v.shape[-1]), torch.empty_like(h0)


@torch.library.custom_op("ssmkit::mamba3_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: torch.Tensor, dhT: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 dA: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, h0: torch.Tensor,
                 tf32x3: bool) -> list[torch.Tensor]:
    return _backward(dy, dhT, q, k, v, dA, s, gamma, h0, tf32x3)


@_scan_bwd_op.register_fake
def _(dy, dhT, q, k, v, dA, s, gamma, h0, tf32x3):
    return [torch.empty_like(t) for t in (q, k, v, dA, s, gamma, h0)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.tf32x3 = inputs[7]


def _scan_backward(ctx, dy, dhT):
    q, k, v, dA, s, gamma, h0 = ctx.saved_tensors
    dy = (torch.zeros(*q.shape[:4], v.shape[-1], device=q.device, dtype=h0.dtype) if dy is None
          else dy.to(h0.dtype).contiguous())
    dhT = torch.zeros_like(h0) if dhT is None else dhT.to(h0.dtype).contiguous()
    return (*_scan_bwd_op(dy, dhT, q, k, v, dA, s, gamma, h0, ctx.tf32x3), None)


_scan_op.register_autograd(_scan_backward, setup_context=_setup)


@functools.cache
def _kernels():
    from ssmkit.ops.mamba3 import triton_chunk

    return triton_chunk


def _triton_core(prep, h0, k0, v0, chunk_size, io_dtype):
    s, gamma, h0 = trapezoid_weights(prep, h0, k0, v0)
    cdt = h0.dtype
    q, k, v, dA, s, gamma, h0 = (t.to(cdt).contiguous() for t in (prep.q, prep.k, prep.v, prep.dA, s, gamma, h0))
    return _scan_op(q, k, v, dA, s, gamma, h0, io_dtype in (torch.bfloat16, torch.float16))


# Not yet what "auto" picks on CUDA: tested against the reference under the interpreter, not yet
# timed on a GPU against the chunked form and mamba_ssm.
def _rank_checked(form):
    """``form`` after a check of the MIMO rank (before any work): a chunk holds all of a token's
    ranks, so R <= BLOCK_M."""

    @functools.wraps(form)
    def run(x, dt, dA, B, C, *args, **kwargs):
        R = 1 if B.dim() == 4 else B.shape[2]
        if R > BLOCK_M:
            raise ValueError(f"backend='triton' takes B, C with a rank R <= {BLOCK_M} (a token's ranks share a "
                             f"chunk of {BLOCK_M} rows), got R={R}")
        return form(x, dt, dA, B, C, *args, **kwargs)

    return run


mamba3_triton = register("mamba3", "triton", auto=False)(_rank_checked(make_form(_triton_core, io_dtype=True)))

__all__ = ["mamba3_step_triton", "mamba3_triton"]
