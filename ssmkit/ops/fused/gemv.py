"""Matrix-vector products for decoding at small batch, optionally behind a fused add + RMSNorm.

At batch 1 a decode step is a chain of GEMVs (``in_proj``, ``out_proj``, the LM head) that only
stream their weights: the time floor is the weight bytes over the memory bandwidth. This op reads
each weight once per program tile with wide loads and, for the ``in_proj`` of a pre-norm block,
also does the block's residual add and RMSNorm in its prologue (one launch instead of two)::

    r' = (r + x) in residual_dtype                          (r' = x without a residual)
    n  = rms_norm(r'.to(nw.dtype)) * nw                     (rounded to nw.dtype)
    y  = n @ weight.T                                       (weight: (N, K); y in weight.dtype)

exactly the arithmetic of :func:`ssmkit.ops.fused.norm.add_rms_norm` followed by ``F.linear``,
with float32 accumulation. Without ``norm_weight``: ``y = x @ weight.T``. Op name
``"norm_linear"``: ``"reference"`` (PyTorch) and ``"triton"`` (inference only: no backward).
Imports without Triton; the kernel compiles on first use.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import get, launch_options, programmatic_launch

__all__ = ["norm_linear", "norm_linear_reference", "norm_linear_triton", "GEMV", "GEMV_RULES"]

# Launch shape: BLOCK_N output rows per program, K read in BLOCK_K columns per loop iteration;
# each program keeps BLOCK_N x BLOCK_K products in registers and reduces them once at the end.
# Measured at batch 1 on an H100 (benchmarks/decode_gpu.py, 2026-11-27, with programmatic
# dependent launch): in_proj 8192x2048 with the norm 13.8 us (cuBLAS + add_rms_norm 16.1),
# out_proj 2048x4096 6.35 us (cuBLAS 10.95), LM head 50280x2048 68.5 us (81.0).
# (min K, launch shape): the first rule whose K bound the product meets.
GEMV_RULES = [(4096, {"block_n": 2, "block_k": 2048, "num_warps": 4}),
              (0, {"block_n": 8, "block_k": 1024, "num_warps": 4})]
# A launch shape for every product, overriding the rules when set (for sweeps).
GEMV: dict = {}


def _launch_shape(K: int) -> dict:
    if GEMV:
        return GEMV
    return next(cfg for k_min, cfg in GEMV_RULES if K >= k_min)


def norm_linear_reference(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                          residual: torch.Tensor | None = None, eps: float = 1e-5,
                          residual_dtype: torch.dtype | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch form of :func:`norm_linear` (no validation): ``(y, new_residual)``."""
    if norm_weight is None:
        return F.linear(x.to(weight.dtype), weight), None
    from ssmkit.ops.fused.norm import add_rms_norm_reference

    n, r = add_rms_norm_reference(x, residual, norm_weight, eps, residual_dtype)
    return F.linear(n.to(weight.dtype), weight), r


@functools.cache
def _kernel():
    """The kernel, defined (and Triton imported) on first use."""
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def gemv_kernel(X, RES, NW, W, Y, RES_OUT, N, K, sx, sr, sy, sro, sw, eps,
                    NORM: tl.constexpr, HAS_RES: tl.constexpr, USE_F64: tl.constexpr,
                    PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        ACC = tl.float64 if USE_F64 else tl.float32  # float32 accumulation (float64 for tests)
        if PDL:  # the next kernel may start and load its weights; it waits for our results
            gdc_launch_dependents()
        # grid (rows, N blocks): the rows of one weight tile run side by side, so at batch > 1
        # the tile comes from DRAM once and from L2 for the other rows.
        row = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        k = tl.arange(0, BLOCK_K)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nc = tl.minimum(n, N - 1)  # rows past N re-read the last one: no row mask on the weight
        wrow = W + nc.to(tl.int64)[:, None] * sw
        # The first weight tile before anything the previous kernel writes (under PDL it loads
        # while that kernel finishes); each iteration then loads the next tile before it
        # computes (masked past K: no memory traffic).
        w = tl.load(wrow + k[None, :], mask=(k < K)[None, :], other=0.0, eviction_policy="evict_first")
        if PDL:
            gdc_wait()
        xrow = X + row * sx
        rrow = RES + row * sr
        if NORM:
            # RMS statistics over the whole row r' = r + x, rounded as add_rms_norm stores it;
            # the N-block-0 program also writes r'.
            ss = tl.zeros([BLOCK_K], dtype=ACC)
            for k0 in range(0, K, BLOCK_K):
                mk = (k0 + k) < K
                h = tl.load(xrow + k0 + k, mask=mk, other=0.0).to(ACC)
                if HAS_RES:
                    h += tl.load(rrow + k0 + k, mask=mk, other=0.0).to(ACC)
                h = h.to(RES_OUT.dtype.element_ty)
                tl.store(RES_OUT + row * sro + k0 + k, h,
                         mask=(k0 + k) < tl.where(pid_n == 0, K, 0))
                hn = h.to(NW.dtype.element_ty).to(ACC)
                ss += hn * hn
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            mk = (k0 + k) < K
            xk = tl.load(xrow + k0 + k, mask=mk, other=0.0).to(ACC)
            if NORM:
                if HAS_RES:
                    xk += tl.load(rrow + k0 + k, mask=mk, other=0.0).to(ACC)
                hn = xk.to(RES_OUT.dtype.element_ty).to(NW.dtype.element_ty).to(ACC)
                nw = tl.load(NW + k0 + k, mask=mk, other=0.0).to(ACC)
                # the normalised row, rounded to the norm's output dtype as the unfused block
                xk = (hn * rstd * nw).to(NW.dtype.element_ty).to(ACC)
            acc += w.to(ACC) * xk[None, :]
            kn = k0 + BLOCK_K + k
            w = tl.load(wrow + kn[None, :], mask=(kn < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
        y = tl.sum(acc, axis=1)
        tl.store(Y + row * sy + n, y.to(Y.dtype.element_ty), mask=n < N)

    return gemv_kernel


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    """``(rows, d)`` with unit stride along ``d``."""
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_linear_triton(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None, eps: float = 1e-5,
                       residual_dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton form of :func:`norm_linear` (no validation, no autograd). ``x, residual: (rows, K)``
    with unit stride along K; ``weight (N, K)`` with unit stride along K."""
    rows, K = x.shape
    N = weight.shape[0]
    x = _unit_rows(x)
    w = _unit_rows(weight)
    y = torch.empty(rows, N, device=x.device, dtype=weight.dtype)
    norm = norm_weight is not None
    if norm:
        from ssmkit.ops.fused.norm import _residual_dtype

        rdt = _residual_dtype(x, residual, residual_dtype)
        r_out = torch.empty(rows, K, device=x.device, dtype=rdt)
        res = _unit_rows(residual) if residual is not None else x
    else:
        r_out, res = None, x
    cfg = _launch_shape(K)
    bn, bk = cfg["block_n"], min(cfg["block_k"], max(16, 1 << (K - 1).bit_length()))
    if rows and N:
        pdl = programmatic_launch(x)
        _kernel()[(rows, -(-N // bn))](
            x, res, norm_weight if norm else x, w, y, r_out if norm else y, N, K,
            x.stride(0), res.stride(0), y.stride(0), r_out.stride(0) if norm else 0, w.stride(0),
            float(eps), NORM=norm, HAS_RES=norm and residual is not None,
            USE_F64=torch.float64 in (x.dtype, weight.dtype), PDL=pdl,
            BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], **launch_options(pdl))
    return y, r_out


def norm_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, *, eps: float = 1e-5,
                residual_dtype: torch.dtype | None = None, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = x @ weight.T``, optionally after the residual add and RMSNorm of a pre-norm block.

    Args:
        x: ``(rows, K)`` the input; with ``norm_weight``, the branch output to add to ``residual``.
        weight: ``(N, K)`` a linear layer's weight; ``y`` has its dtype.
        norm_weight: ``(K,)`` RMSNorm weight, or None for a plain product.
        residual: ``(rows, K)`` the residual stream (with ``norm_weight``), or None.
        residual_dtype: dtype of the new residual (default: promoted from ``x``/``residual``).
        backend: ``"auto"`` (Triton on CUDA without autograd, else PyTorch), ``"reference"``,
            ``"triton"``.

    Returns:
        ``(y (rows, N), new_residual (rows, K) or None)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape (rows, K), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    K = x.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (N, K={K}), got {got}")
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise ValueError(f"norm_weight must have shape (K={K},), got {tuple(norm_weight.shape)}")
    if residual is not None:
        if norm_weight is None:
            raise ValueError("residual needs norm_weight (the residual add belongs to the norm)")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if backend == "auto" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, norm_weight, residual)):
        backend = "reference"  # the Triton form has no backward
    return get("norm_linear", backend, x)(x, weight, norm_weight, residual, eps, residual_dtype)
