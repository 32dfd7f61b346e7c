"""``backend="triton"`` forms of :func:`ssmkit.ops.delta_rule` and :func:`delta_rule_step`.

Same signatures and results as the other forms::

    delta_rule_triton(q, k, v, beta, g=None, scale=None, use_qk_l2norm=False, chunk_size=64,
                      initial_state=None, return_final_state=False, cu_seqlens=None)
    delta_rule_step_triton(state, q, k, v, beta, g, scale, use_qk_l2norm, state_batch_indices=None)

Shapes as in :func:`ssmkit.ops.delta_rule`: ``q, k: (batch, seqlen, H, K)``, ``v: (batch, seqlen,
Hv, V)``, ``beta, g: (batch, seqlen, Hv)``, states ``(batch | num_seqs, Hv, K, V)``. The chunked
WY / UT kernels (:mod:`triton_kernels`) run forward and backward (an ``autograd.Function``:
gradients of q, k, v, beta, g and the initial state, the final state differentiable); the state
is float32 (float64 for float64 inputs). Half-precision inputs multiply on the tensor cores in
their own dtype with float32 accumulation; the computed operands (the UT inverse T, W, the
pseudo-values U, the state and the adjoints) go in as two half-precision parts (hi + lo, three
matmuls): a float64 emulation of the forward puts one bfloat16 rounding of T, U and the state
at 4.5e-3 relative error against float64, 10-bit operands at 1.5e-3 (README.md; the GPU tests
hold bfloat16 to 5e-3). Float32 inputs multiply in IEEE float32. ``chunk_size`` does not change
the result: the kernels use their own chunk (:data:`BLOCK_T`). The decoding step is one fused recurrent
kernel over T >= 1 tokens. The kernels are imported on first use, so this module imports without
Triton.

``backend="auto"`` does not pick these forms yet (registered with ``auto=False``): ask for them
with ``backend="triton"``, ``ssmkit.ops.dispatch.force_backend("triton")`` or
``SSMKIT_BACKEND=triton``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register

BLOCK_T = 64  # tokens per chunk
NUM_WARPS = 4
# V columns per program of the backward's per-chunk pass on the float32 (IEEE) path: 64 needs
# 240 KiB of shared memory at K = 128, more than an H100 block has
CHUNK_BV_IEEE = 32


def _stages(split: bool) -> int:
    """Software-pipelining stages of the kernels that loop over chunks: the float32 tiles of the
    IEEE path buffered three deep need more shared memory than an H100 block has (289 KiB in the
    backward's first pass at K = V = 128), so that path loads each chunk unbuffered."""
    return 3 if split else 1

triton = None  # imported on first call (keeps this module importable without Triton)


def _import():
    global triton
    if triton is None:
        import triton as _triton

        triton = _triton
    from ssmkit.ops.delta_rule import triton_kernels

    return triton_kernels


def _next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _dtypes(*ts):
    """(compute dtype, tl compute dtype, tl matmul operand dtype, dot precision, split operands):
    half-precision q, k, v multiply on the tensor cores in their own dtype, computed operands
    split in two (see ``triton_kernels._mmx``); float32 in IEEE float32, float64 in float64."""
    import triton.language as tl

    live = [t for t in ts if t is not None]
    if any(t.dtype == torch.float64 for t in live):
        return torch.float64, tl.float64, tl.float64, "ieee", False
    half = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if all(t.dtype == ts[0].dtype for t in ts[:3]) and ts[0].dtype in half:
        return torch.float32, tl.float32, half[ts[0].dtype], "tf32", True
    return torch.float32, tl.float32, tl.float32, "ieee", False


def _blocks(K: int, V: int) -> tuple[int, int]:
    return _next_pow2(K), min(_next_pow2(V), 64)


def _chunk_offsets(cu, nseq: int, L: int):
    """(first chunk of each sequence in the state scratch, scratch size in chunks): prefix sums of
    ceil(len / BLOCK_T) with packed sequences (an upper bound on the total that reads nothing
    back from the device), else sequence i starts at chunk i * ceil(L / BLOCK_T)."""
    nch_max = triton.cdiv(L, BLOCK_T)
    if cu is None:
        return None, nseq * nch_max, nch_max
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    choff = F.pad(torch.cumsum((lens + BLOCK_T - 1) // BLOCK_T, 0), (1, 0))[:-1].to(torch.int32)
    return choff, nch_max + nseq, nch_max


def _forward(q, k, v, beta, g, h0, cu, scale, l2, store_ht, store_states):
    kern = _import()
    B, L, H, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    nseq = B if cu is None else cu.numel() - 1
    cdt, CDT, MM, prec, split = _dtypes(q, k, v, beta, g, h0)
    BK, BV = _blocks(K, V)
    choff, total_chunks, nch_max = _chunk_offsets(cu, nseq, L)
    o = torch.empty(v.shape, device=v.device, dtype=q.dtype)
    hT = torch.empty(nseq, Hv, K, V, device=q.device, dtype=cdt) if store_ht else None
    S = torch.empty(total_chunks, Hv, K, V, device=q.device, dtype=cdt) if store_states else None
    T = torch.empty(total_chunks, Hv, BLOCK_T, BLOCK_T, device=q.device, dtype=cdt) if store_states else None
    grid = (nseq * Hv, triton.cdiv(V, BV))
    scratch = torch.empty(grid[0] * grid[1], BLOCK_T, BLOCK_T, device=q.device, dtype=cdt)
    dummy = beta
    kern._dr_fwd[grid](
        q, k, v, beta, g if g is not None else dummy, h0 if h0 is not None else dummy,
        cu if cu is not None else dummy, choff if choff is not None else dummy, o,
        hT if hT is not None else dummy, S if S is not None else dummy, T if T is not None else dummy, scratch,
        L, H, Hv, K, V, nch_max, float(scale),
        GATED=g is not None, L2NORM=bool(l2), HAS_H0=h0 is not None, STORE_HT=store_ht, STORE_S=store_states,
        VARLEN=cu is not None, PREC=prec, CDT=CDT, MM_DT=MM, SPLIT=split, BT=BLOCK_T, BK=BK, BV=BV, num_warps=NUM_WARPS,
        num_stages=_stages(split),
    )
    return o, hT, (S, T) if store_states else None


def _l2norm_backward(x, dy, cdt):
    """Gradient of x / sqrt(|x|² + 1e-6) (last axis) given the output's gradient ``dy``."""
    x = x.to(cdt)
    rstd = torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
    y = x * rstd
    return (dy - y * (dy * y).sum(-1, keepdim=True)) * rstd


def _backward(q, k, v, beta, g, h0, cu, saved, scale, l2, do, dhT):
    """Gradients from the forward's inputs and ``saved = (S, T)``: the state entering every chunk
    and every chunk's UT inverse, as the forward stored them."""
    kern = _import()
    S, T = saved
    B, L, H, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    nseq = B if cu is None else cu.numel() - 1
    cdt, CDT, MM, prec, split = _dtypes(q, k, v, beta, g, h0)
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    BVc = BV if split else min(BV, CHUNK_BV_IEEE)  # V columns per program of the per-chunk pass
    NVc = triton.cdiv(V, BVc)
    choff, _, nch_max = _chunk_offsets(cu, nseq, L)
    ntok = B * L
    alloc = torch.zeros if cu is not None else torch.empty  # packed: rows outside every sequence stay 0
    dq_p = alloc(NVc, ntok, Hv, K, device=q.device, dtype=cdt)
    dk_p = alloc(NVc, ntok, Hv, K, device=q.device, dtype=cdt)
    dbeta_p = alloc(NVc, ntok, Hv, device=q.device, dtype=cdt)
    dg_p = alloc(NVc, ntok, Hv, device=q.device, dtype=cdt) if g is not None else None
    dv = alloc(v.shape, device=v.device, dtype=v.dtype)
    dh0 = torch.empty(nseq, Hv, K, V, device=q.device, dtype=cdt) if h0 is not None else None
    dS = torch.empty_like(S)
    dummy = dbeta_p
    cu_ = cu if cu is not None else dummy
    choff_ = choff if choff is not None else dummy
    opts = dict(GATED=g is not None, L2NORM=bool(l2), VARLEN=cu is not None, PREC=prec, CDT=CDT, MM_DT=MM,
                SPLIT=split, BT=BLOCK_T, BK=BK, num_warps=NUM_WARPS)
    kern._dr_bwd_dh[(nseq * Hv, NV)](
        q, k, beta, g if g is not None else dummy, cu_, choff_, T, do, dhT if dhT is not None else dummy, dS,
        dh0 if dh0 is not None else dummy, L, H, Hv, K, V, nch_max, float(scale),
        HAS_H0=h0 is not None, HAS_DHT=dhT is not None, BV=BV, num_stages=_stages(split), **opts)
    cseq = dummy
    if cu is not None:  # the sequence of every chunk in the scratch (nseq past the last one)
        cseq = torch.searchsorted(choff, torch.arange(S.shape[0], device=q.device, dtype=torch.int32),
                                  right=True).to(torch.int32) - 1
        ends = choff + ((cu[1:] - cu[:-1]) + BLOCK_T - 1) // BLOCK_T
        cseq = torch.where(torch.arange(S.shape[0], device=q.device) < ends[-1], cseq, nseq).to(torch.int32)
    kern._dr_bwd_chunk[(S.shape[0], Hv, NVc)](
        q, k, v, beta, g if g is not None else dummy, cu_, choff_, cseq, S, T, dS, do,
        dq_p, dk_p, dv, dbeta_p, dg_p if dg_p is not None else dummy,
        L, ntok, nseq, H, Hv, K, V, nch_max, float(scale), BV=BVc, **opts)
    r = Hv // H
    dq = dq_p.sum(0).view(B, L, H, r, K).sum(3) * scale
    dk = dk_p.sum(0).view(B, L, H, r, K).sum(3)
    if l2:
        dq, dk = _l2norm_backward(q, dq, cdt), _l2norm_backward(k, dk, cdt)
    dbeta = dbeta_p.sum(0).view(beta.shape)
    dg = dg_p.sum(0).view(g.shape).to(g.dtype) if g is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv, dbeta.to(beta.dtype), dg, dh0


class _DeltaRuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, cu, scale, l2, store_ht):
        grad = any(ctx.needs_input_grad[:6])
        o, hT, saved = _forward(q, k, v, beta, g, h0, cu, scale, l2, store_ht, grad)
        S, T = saved if saved is not None else (None, None)
        ctx.save_for_backward(q, k, v, beta, g, h0, cu, S, T)
        ctx.opts = (scale, l2)
        if hT is None:
            return o, None
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, v, beta, g, h0, cu, S, T = ctx.saved_tensors
        scale, l2 = ctx.opts
        grads = _backward(q, k, v, beta, g, h0, cu, (S, T), scale, l2, do.contiguous(),
                          None if dhT is None else dhT.contiguous())
        dh0 = grads[5]
        return (*grads[:5], None if dh0 is None else dh0.to(h0.dtype), None, None, None, None)


def delta_rule_triton(q, k, v, beta, g=None, scale=None, use_qk_l2norm=False, chunk_size=64, initial_state=None,
                      return_final_state=False, cu_seqlens=None):
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    cdt = _cdt(q, k, v, beta, g, initial_state)
    h0 = None if initial_state is None else initial_state.to(cdt).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    o, hT = _DeltaRuleFn.apply(q, k, v, beta, g, h0, cu, 1.0 if scale is None else float(scale),
                               bool(use_qk_l2norm), bool(return_final_state))
    return (o, hT) if return_final_state else o


def recompute_backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, use_qk_l2norm, do, dhT):
    """Gradients of (q, k, v, beta, g, initial_state) (None where the input is None) from the
    forward's inputs alone: the forward kernel stores the chunk states again, then the backward
    kernels run (the custom op's backward, :mod:`ssmkit.ops.custom_ops`)."""
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    cdt = _cdt(q, k, v, beta, g, initial_state)
    h0 = None if initial_state is None else initial_state.to(cdt).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    scale = 1.0 if scale is None else float(scale)
    _, _, saved = _forward(q, k, v, beta, g, h0, cu, scale, use_qk_l2norm, False, True)
    grads = _backward(q, k, v, beta, g, h0, cu, saved, scale, use_qk_l2norm, do.contiguous(),
                      None if dhT is None else dhT.contiguous())
    dh0 = grads[5]
    return (*grads[:5], None if dh0 is None else dh0.to(initial_state.dtype))


def _cdt(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def delta_rule_step_triton(state, q, k, v, beta, g, scale, use_qk_l2norm, state_batch_indices=None):
    """T tokens, ``q, k: (batch, T, H, K)``, ``state (batch | num_slots, Hv, K, V)`` updated in
    place (no validation): the fused recurrent kernel."""
    import triton.language as tl

    kern = _import()
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    B, T, H, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    BK, BV = _next_pow2(K), min(_next_pow2(V), 64)
    o = torch.empty(v.shape, device=v.device, dtype=q.dtype)
    idx = None if state_batch_indices is None else state_batch_indices.to(torch.int64).contiguous()
    kern._dr_step[(B * Hv, triton.cdiv(V, BV))](
        state, idx if idx is not None else beta, q, k, v, beta, g if g is not None else beta, o,
        T, H, Hv, K, V, 1.0 if scale is None else float(scale),
        GATED=g is not None, L2NORM=bool(use_qk_l2norm), HAS_IDX=idx is not None,
        CDT=tl.float64 if state.dtype == torch.float64 else tl.float32, BK=BK, BV=BV, num_warps=NUM_WARPS,
    )
    return o


# Not yet what "auto" picks on CUDA: correct (tests against the reference, in the interpreter),
# but not yet timed against the chunked form and flash-linear-attention on a GPU.
register("delta_rule", "triton", auto=False)(delta_rule_triton)
register("delta_rule_step", "triton", auto=False)(delta_rule_step_triton)
