"""``backend="triton"`` form of :func:`ssmkit.ops.ssd`: the fused-chunk kernels (an ``autograd.Function``).

Same signature and results as the other forms (:func:`ssmkit.ops.ssd._common.make_form`'s)::

    ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, inf), initial_state=None, return_final_state=False, cu_seqlens=None)

Shapes as in :func:`ssmkit.ops.ssd`: ``x, z: (batch, seqlen, H, P)``, ``dt: (batch, seqlen, H)``,
``A: (H,)``, ``B, C: (batch, seqlen, G, N)``, ``D: (H,)`` or ``(H, P)``, ``dt_bias: (H,)``,
``initial_state: (batch | num_seqs, H, P, N)``. Half-precision inputs go through the tensor cores
with float32 accumulation and a float32 state; float32 inputs are computed in float32 (IEEE
matmuls, not TF32), float64 in float64. ``chunk_size`` does not change the result; the kernels
use their own block of tokens (:data:`BLOCK_Q`). The kernels (:mod:`triton_fused_chunk`) are
imported on first use, so this module imports without Triton.

``backend="auto"`` does not pick this form yet (it is registered with ``auto=False``): ask for it
with ``backend="triton"``, ``ssmkit.ops.dispatch.force_backend("triton")`` or
``SSMKIT_BACKEND=triton``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register

BLOCK_Q = 64  # tokens per chunk
FWD_WARPS = 4  # warps per program of the forward
BWD_WARPS = 8  # warps per program of the backward's per-chunk passes
WALK_WARPS = 4  # warps per program of the backward's walks over chunks
STATE_ROWS = 32  # rows of the state per program in those walks
DBC_HEADS = 8  # heads per program of the dB/dC pass
FWD_SPLIT = False  # the forward as a walk over the states, then every chunk's output at once
STATES_HALF = True  # the backward's chunk-boundary states and adjoints in half precision


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _cdt(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _row_major(t):
    """``t`` with a unit stride on its last axis (the kernels read rows of it)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, h0, cu, store_ht):
    from ssmkit.ops.ssd import triton_fused_chunk as k

    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cdt = _cdt(x, dt, B, C, h0)
    nseq = b if cu is None else cu.numel() - 1
    y = torch.empty_like(x)
    hT = torch.empty(nseq, H, P, N, device=x.device, dtype=cdt) if store_ht else x.new_empty(1, dtype=cdt)
    BLOCK_P = min(_next_pow2(P), 64)
    BLOCK_N = _next_pow2(N)
    zz = z if z is not None else x
    grid = (nseq * H, _cdiv(P, BLOCK_P))
    k._ssd_fwd[grid](
        x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A,
        h0 if h0 is not None else hT, cu if cu is not None else A,
        y, hT,
        L, H, P, N, H // G, *_limits(dt_limit),
        x.stride(0), x.stride(1), x.stride(2),
        dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, HAS_H0=h0 is not None, STORE_HT=store_ht,
        VARLEN=cu is not None, DT_SOFTPLUS=bool(dt_softplus),
        IEEE=x.dtype in (torch.float32, torch.float64), CDT=_tl_dtype(cdt),
        BLOCK_Q=BLOCK_Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=FWD_WARPS,
    )
    return y, hT


def _chunk_layout(cu, nseq: int, L: int, dummy):
    """``(chunks per sequence at most, first chunk of each sequence in the state scratch, chunks
    in the scratch)``; without packed sequences the offsets are implicit (``dummy``)."""
    nch_max = _cdiv(L, BLOCK_Q)
    if cu is None:
        return nch_max, dummy, nseq * nch_max
    # prefix sums of ceil(len / Q); the scratch size is an upper bound that needs no read of cu_seqlens
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    choff = F.pad(torch.cumsum((lens + BLOCK_Q - 1) // BLOCK_Q, 0), (1, 0))[:-1].to(torch.int32)
    return nch_max, choff, nch_max + nseq


def _walk_states(x, dt, A, B, dt_bias, h0, cu, choff, S, hT, nch_max, dt_softplus, dt_limit, cdt):
    """The state entering every chunk into ``S (chunks, H, P, N)`` (and the final state into
    ``hT`` when it is not None): :func:`triton_fused_chunk._ssd_states_fwd`."""
    from ssmkit.ops.ssd import triton_fused_chunk as k

    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nseq = b if cu is None else cu.numel() - 1
    block_p = min(_next_pow2(P), STATE_ROWS)
    k._ssd_states_fwd[(nseq * H, _cdiv(P, block_p))](
        x, dt, A, B, A if dt_bias is None else dt_bias, A if h0 is None else h0, A if cu is None else cu, choff,
        S, S if hT is None else hT,
        L, H, P, N, H // G, nch_max, *_limits(dt_limit),
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        HAS_BIAS=dt_bias is not None, HAS_H0=h0 is not None, STORE_HT=hT is not None, VARLEN=cu is not None,
        DT_SOFTPLUS=bool(dt_softplus), IEEE=x.dtype in (torch.float32, torch.float64), CDT=_tl_dtype(cdt),
        BLOCK_Q=BLOCK_Q, BLOCK_P=block_p, BLOCK_N=_next_pow2(N), num_warps=WALK_WARPS)


def _launch_fwd_split(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, h0, cu, store_ht):
    """The forward in two passes: the states entering every chunk (a walk over the chunks, one
    matmul a chunk), then every chunk's output at once."""
    from ssmkit.ops.ssd import triton_fused_chunk as k

    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cdt = _cdt(x, dt, B, C, h0)
    nseq = b if cu is None else cu.numel() - 1
    nch_max, choff, total_chunks = _chunk_layout(cu, nseq, L, A)
    y = torch.empty_like(x)
    hT = torch.empty(nseq, H, P, N, device=x.device, dtype=cdt) if store_ht else x.new_empty(1, dtype=cdt)
    # the output kernel reads the states in the matmuls' operand dtype: half precision for
    # half-precision inputs, which halves the states' memory traffic and changes no result
    S = torch.empty(total_chunks, H, P, N, device=x.device, dtype=x.dtype if x.element_size() == 2 else cdt)
    _walk_states(x, dt, A, B, dt_bias, h0, cu, choff, S, hT if store_ht else None, nch_max, dt_softplus,
                 dt_limit, cdt)
    block_p = min(_next_pow2(P), 64)
    zz = z if z is not None else x
    k._ssd_fwd_chunk[(nseq * H * nch_max, _cdiv(P, block_p))](
        x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A,
        cu if cu is not None else A, choff, S, y,
        L, H, P, N, H // G, nch_max, *_limits(dt_limit),
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, VARLEN=cu is not None, DT_SOFTPLUS=bool(dt_softplus),
        IEEE=x.dtype in (torch.float32, torch.float64), CDT=_tl_dtype(cdt),
        BLOCK_Q=BLOCK_Q, BLOCK_P=block_p, BLOCK_N=_next_pow2(N), num_warps=FWD_WARPS)
    return y, hT


def _limits(dt_limit) -> tuple[float, float]:
    """The clamp of Δ as the kernels take it: none at all unless a bound is set (as ``process_dt``)."""
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if lo > 0.0 or hi != math.inf:
        return lo, min(hi, 3.0e38)
    return -3.0e38, 3.0e38


def _tl_dtype(dt):
    import triton.language as tl

    return tl.float64 if dt == torch.float64 else tl.float32


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, cu, dt_softplus, dt_limit, store_ht):
        launch = _launch_fwd_split if FWD_SPLIT else _launch_fwd
        y, hT = launch(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, h0, cu, store_ht)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, cu)
        ctx.opts = (dt_softplus, dt_limit)
        ctx.store_ht = store_ht
        ctx.mark_non_differentiable(*(() if store_ht else (hT,)))
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, B, C, D, z, dt_bias, h0, cu = ctx.saved_tensors
        # Without a final state, hT is a one-element placeholder and autograd hands back zeros
        # of its shape: no gradient reaches the state then (the kernels must not read it).
        grads = backward(x, dt, A, B, C, D, z, dt_bias, h0, cu, *ctx.opts, dy, dhT if ctx.store_ht else None)
        return (*grads, None, None, None, None)


def backward(x, dt, A, B, C, D, z, dt_bias, h0, cu, dt_softplus, dt_limit, dy, dhT):
    """Gradients of (x, dt, A, B, C, D, z, dt_bias, h0) (None where the input is None) from the
    forward's inputs, ``dy`` and ``dhT`` (None: no gradient reaches the final state): the states
    entering each chunk are recomputed and the adjoints leaving each chunk computed (two walks over
    the chunks, light: one matmul a chunk), then every chunk's gradients at once, then dB/dC
    summed per group."""
    nseq_ = x.shape[0] if cu is None else cu.numel() - 1
    if dhT is not None and dhT.shape != (nseq_, x.shape[2], x.shape[3], B.shape[3]):
        raise ValueError(f"dhT must have the final state's shape {(nseq_, x.shape[2], x.shape[3], B.shape[3])}, "
                         f"got {tuple(dhT.shape)}")
    x, dt, B, C, z, dy = (_row_major(t) for t in (x, dt, B, C, z, dy))
    A, D, dt_bias, h0 = (None if t is None else t.contiguous() for t in (A, D, dt_bias, h0))
    from ssmkit.ops.ssd import triton_fused_chunk as k

    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cdt = _cdt(x, dt, B, C, h0)
    nseq = b if cu is None else cu.numel() - 1
    nch_max, choff, total_chunks = _chunk_layout(cu, nseq, L, A)
    BLOCK_P = _next_pow2(P)
    BLOCK_N = _next_pow2(N)
    BLOCK_PS = min(BLOCK_P, STATE_ROWS)
    # the states and adjoints at the chunk boundaries enter the matmuls in the operands' dtype:
    # kept in half precision for half-precision inputs (only the decay's gradient also reads them
    # in float32), which halves their memory traffic
    S = torch.empty(total_chunks, H, P, N, device=x.device,
                    dtype=x.dtype if STATES_HALF and x.element_size() == 2 else cdt)
    dS = torch.empty_like(S)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # (the kernels take each one's strides)
    ddt = torch.empty(dt.shape, device=x.device, dtype=dt.dtype)
    dz = torch.empty(z.shape, device=x.device, dtype=z.dtype) if z is not None else None
    dys = torch.empty(x.shape, device=x.device, dtype=x.dtype if x.element_size() == 2 else cdt)  # (read as x.dtype)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    # per (sequence, head, chunk) terms of dA, d(dt_bias) and dD (zero where a sequence has no such chunk)
    dA_p = torch.zeros(nseq, H, nch_max, device=x.device, dtype=cdt)
    dbias_p = torch.zeros(nseq, H, nch_max, device=x.device, dtype=cdt) if dt_bias is not None else None
    dD_p = torch.zeros(nseq, H, nch_max, BLOCK_P, device=x.device, dtype=cdt) if D is not None else None
    dummy = A
    lo, hi = _limits(dt_limit)
    common = dict(VARLEN=cu is not None, DT_SOFTPLUS=bool(dt_softplus),
                  IEEE=x.dtype in (torch.float32, torch.float64), CDT=_tl_dtype(cdt),
                  BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N)
    strides = (x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
               B.stride(0), B.stride(1), B.stride(2))
    cu_ = cu if cu is not None else dummy
    bias_ = dt_bias if dt_bias is not None else dummy
    zz = z if z is not None else x
    dzz = dz if dz is not None else dx
    walk_grid = (nseq * H, _cdiv(P, BLOCK_PS))
    # the two walks over the chunks: states forwards, their adjoints backwards
    _walk_states(x, dt, A, B, dt_bias, h0, cu, choff, S, None, nch_max, dt_softplus, dt_limit, cdt)
    k._ssd_dstates_bwd[walk_grid](
        dt, A, C, zz, bias_, cu_, choff, dy, dhT.contiguous() if dhT is not None else dummy, dS,
        dh0 if dh0 is not None else dummy,
        L, H, P, N, H // G, nch_max, lo, hi, dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_H0=h0 is not None, HAS_DHT=dhT is not None,
        BLOCK_P=BLOCK_PS, num_warps=WALK_WARPS, **common)
    # every chunk at once from its entering state and leaving adjoint
    k._ssd_bwd[(nseq * H * nch_max,)](
        x, dt, A, B, C, D if D is not None else dummy, zz, bias_, cu_, choff, S, dS, dy,
        dx, ddt, dzz, dys, dA_p, dD_p if dD_p is not None else dummy, dbias_p if dbias_p is not None else dummy,
        L, H, P, N, H // G, nch_max, lo, hi, *strides,
        zz.stride(0), zz.stride(1), zz.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2), dzz.stride(0), dzz.stride(1), dzz.stride(2),
        ddt.stride(0), ddt.stride(1), dys.stride(0), dys.stride(1), dys.stride(2),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, BLOCK_P=BLOCK_P, num_warps=BWD_WARPS, **common)
    # dB, dC: a program sums DBC_HEADS heads of a group; several programs per group add their
    # float32 partial sums on the host
    hpg = H // G
    per_prog = min(DBC_HEADS, hpg)
    splits = _cdiv(hpg, per_prog)
    if splits > 1:
        dB = torch.empty(splits, *B.shape, device=x.device, dtype=cdt)
        dC = torch.empty_like(dB)
    else:
        dB = torch.empty(B.shape, device=x.device, dtype=B.dtype)
        dC = torch.empty(C.shape, device=x.device, dtype=C.dtype)
    k._ssd_bwd_dbc[(nseq * nch_max, G * splits)](
        x, dt, A, B, C, bias_, cu_, choff, S, dS, dys, dB, dC,
        L, H, P, N, hpg, nch_max, lo, hi, per_prog, splits, *strides,
        dys.stride(0), dys.stride(1), dys.stride(2),
        dB.stride(0) if splits > 1 else 0, *dB.stride()[-4:-1],
        HAS_BIAS=dt_bias is not None, BLOCK_P=BLOCK_P, num_warps=BWD_WARPS,
        num_stages=2, **common)  # (3 stages exceed shared memory)
    if splits > 1:
        dB, dC = dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype)
    dA = dA_p.sum((0, 2))
    dD = None
    if D is not None:
        dD = dD_p[..., :P].sum((0, 2))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    dbias = dbias_p.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt, dA.to(A.dtype), dB, dC, dD, dz, dbias, dh0


def ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, math.inf), initial_state=None, return_final_state=False, cu_seqlens=None):
    x, dt, B, C, z = (_row_major(t) for t in (x, dt, B, C, z))
    A = A.contiguous()
    D = None if D is None else D.contiguous()
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    cdt = _cdt(x, dt, B, C, initial_state)
    h0 = None if initial_state is None else initial_state.to(cdt).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    y, hT = _SSDFn.apply(x, dt, A.to(cdt), B, C, D, z, dt_bias, h0, cu, dt_softplus, tuple(dt_limit),
                         bool(return_final_state))
    return (y, hT) if return_final_state else y


# Not yet what "auto" picks on CUDA: correct (tests against the reference, in the interpreter),
# but not yet timed against the chunked form and mamba_ssm on a GPU (docs/gpu.md, SSD).
register("ssd", "triton", auto=False)(ssd_triton)
