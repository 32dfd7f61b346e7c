"""Pieces shared by the selective-scan forms: dtype promotion, Δ preprocessing, the output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """Δ = softplus(dt + dt_bias) (Mamba, Algorithm 2 line 3) or dt + dt_bias, in ``dtype``."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20 (linear above), as mamba_ssm and Hugging Face do
    return dt


def as_groups(M: torch.Tensor) -> torch.Tensor:
    """B or C ``(batch, seqlen, N)`` -> ``(batch, seqlen, 1, N)``; 4-D input unchanged."""
    return M.unsqueeze(2) if M.dim() == 3 else M


def finish(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
           out_dtype: torch.dtype) -> torch.Tensor:
    """y = (C·h + D·x) * silu(z) (the gated output of the Mamba block), cast to ``out_dtype``."""
    if not torch.is_grad_enabled() or not y.requires_grad and not any(
        t is not None and t.requires_grad for t in (x, D, z)
    ):
        # No graph to record: update the scan's fresh output in place (saves two full-size
        # allocations per layer, which cost page faults on the CPU).
        if D is not None:
            y.addcmul_(x.to(y.dtype), D.to(y.dtype))
        if z is not None:
            y.mul_(F.silu(z.to(y.dtype)))
        return y.to(out_dtype)
    if D is not None:
        y = y + x.to(y.dtype) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def segments(cu_seqlens: torch.Tensor | None, seqlen: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, seqlen)]
    c = cu_seqlens.tolist()
    return [(int(a), int(b)) for a, b in zip(c[:-1], c[1:])]
