"""Fused residual add + RMSNorm (the pre-norm of every block): one pass over the residual stream.

For a row ``x`` (the previous branch's output) and the residual stream ``r``::

    r' = (r + x) in residual_dtype          (r' = x when there is no residual yet)
    y  = rms_norm(r'.to(weight.dtype)) * weight     in weight.dtype, statistics in float32

which is exactly what :class:`~ssmkit.models.block.Block` computes unfused (it casts the residual
to the norm weight's dtype before normalising, as ``mamba_ssm`` does), so the fused and unfused
models agree. Op name ``"add_rms_norm"``: ``"reference"`` (PyTorch, differentiable) and
``"triton"`` (one launch, inference only: it has no backward). Imports without Triton.
"""

from __future__ import annotations

import functools

import torch

from ssmkit.ops.dispatch import get

__all__ = ["rms_norm", "add_rms_norm", "add_rms_norm_reference", "add_rms_norm_triton"]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5,
             group_size: int | None = None) -> torch.Tensor:
    """RMS-normalise the last dimension of ``x`` (in groups of ``group_size``), in float32."""
    dtype = x.dtype
    xf = _upcast(x)
    d = xf.shape[-1]
    if group_size is not None and group_size != d:
        if d % group_size:
            raise ValueError(f"group_size={group_size} must divide the last dimension {d}")
        xg = xf.reshape(*xf.shape[:-1], d // group_size, group_size)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
        xf = xg.reshape(xf.shape)
    else:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = xf * _upcast(weight)
    return xf.to(dtype)

# One program normalises one row held in registers; wider rows fall back to the reference.
_MAX_TRITON_D = 32768


def _residual_dtype(x: torch.Tensor, residual: torch.Tensor | None,
                    residual_dtype: torch.dtype | None) -> torch.dtype:
    if residual_dtype is not None:
        return residual_dtype
    return x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float = 1e-5, residual_dtype: torch.dtype | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch form of :func:`add_rms_norm` (no validation): ``(y, new_residual)``."""
    h = x if residual is None else residual + x
    h = h.to(_residual_dtype(x, residual, residual_dtype))
    return rms_norm(h.to(weight.dtype), weight, eps), h


@functools.cache
def _kernel():
    """The kernels, defined (and Triton imported) on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(X, RES, W, Y, RES_OUT, d, stride_x, stride_r, stride_y, stride_ro, eps,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < d
        h = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(RES + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
        # Round as the unfused model does: the residual is stored in its dtype, and the norm
        # sees it cast to the weight's dtype.
        h = h.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, h, mask=m)
        hn = h.to(W.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hn * hn, axis=0) / d + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (hn * rstd * w).to(Y.dtype.element_ty), mask=m)

    return add_rms_norm_kernel


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(rows, d)`` with unit stride along ``d`` (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float = 1e-5, residual_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`add_rms_norm` (no validation, no autograd): one launch, one row per
    program. ``x, residual: (..., d)``; returns ``(y, new_residual)`` of the same shape."""
    d = x.shape[-1]
    if d > _MAX_TRITON_D:
        return add_rms_norm_reference(x, residual, weight, eps, residual_dtype)
    rdt = _residual_dtype(x, residual, residual_dtype)
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    y = torch.empty(x.shape, device=x.device, dtype=weight.dtype)
    r_out = torch.empty(x.shape, device=x.device, dtype=rdt)
    n = x2.shape[0]
    if n:
        block = triton_next_pow2(d)
        # about 8 elements per thread: enough loads in flight, no spills for d up to 32K
        warps = max(1, min(16, block // 256))
        _kernel()[(n,)](x2, r2, weight, y, r_out, d, x2.stride(0), r2.stride(0), d, d, float(eps),
                        HAS_RES=residual is not None, BLOCK=block, num_warps=warps)
    return y, r_out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *,
                 eps: float = 1e-5, residual_dtype: torch.dtype | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``(y, new_residual)``.

    Args:
        x: ``(..., d)`` the branch output to add (or the embedding, with ``residual=None``).
        residual: ``(..., d)`` the residual stream, or None.
        weight: ``(d,)`` the norm weight; ``y`` has its dtype.
        residual_dtype: dtype of the new residual (default: promoted from ``x``/``residual``).
        backend: ``"auto"`` (Triton on CUDA without autograd, else PyTorch), ``"reference"``,
            ``"triton"``.

    Returns:
        ``y = rms_norm((residual + x).to(weight.dtype)) * weight`` and ``residual + x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., d)")
    d = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d,):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (d={d},), got {got}")
    if backend == "auto" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, residual, weight)):
        backend = "reference"  # the Triton form has no backward
    return get("add_rms_norm", backend, x)(x, residual, weight, eps, residual_dtype)
