"""RMSNorm and the gated RMSNorm of Mamba-2.

RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * weight, computed in float32.

Gated RMSNorm (Mamba-2, Dao & Gu 2024, Sec. 8 / Fig. 6): with ``norm_before_gate=False`` (the
default of ``mamba_ssm``), y = RMSNorm(x * silu(z)); with ``True``, y = RMSNorm(x) * silu(z).
``group_size`` normalises each group of ``group_size`` channels separately, as ``mamba_ssm``
does for ``ngroups > 1`` (Hugging Face's Mamba-2 normalises over all of d_inner instead; the
two agree when ``group_size == d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit.ops.fused.norm import _upcast, rms_norm  # noqa: F401  (rms_norm: part of this module's API)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``(..., d) -> (..., d)``."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as its offset from 1: ``y = x / rms(x) * (1 + weight)``
    (Qwen3-Next, Gemma). The weight starts at zero; weight decay pulls the scale towards 1."""

    def __init__(self, d: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, 1.0 + _upcast(self.weight), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centred=True"


class RMSNormGated(nn.Module):
    """Gated RMSNorm of Mamba-2: ``forward(x, z)`` with ``x, z: (..., d)``."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            return rms_norm(x, self.weight, self.eps, self.group_size)
        if self.norm_before_gate:
            y = _upcast(rms_norm(x, self.weight, self.eps, self.group_size)) * F.silu(_upcast(z))
            return y.to(x.dtype)
        gated = _upcast(x) * F.silu(_upcast(z))
        return rms_norm(gated, self.weight, self.eps, self.group_size).to(x.dtype)
