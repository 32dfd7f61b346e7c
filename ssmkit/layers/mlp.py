"""SwiGLU feed-forward block (Shazeer, 2020): ``fc2(a * silu(g))`` with ``[a, g] = fc1(x)``.

Parameter names follow ``mamba_ssm``'s ``GatedMLP`` (``fc1`` of shape ``(2 * hidden, d_model)``
whose first half is the value ``a`` and second half the gate ``g``; ``fc2``), so its checkpoints load
without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int, check_tensor


class MLP(nn.Module):
    """SwiGLU MLP: ``(..., d_model) -> (..., d_model)`` through ``hidden`` gated units."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        self.d_model = d_model
        self.hidden = hidden
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(*([None] * (x.dim() - 1)), self.d_model) if isinstance(x, torch.Tensor) else None,
                     desc=f"(..., d_model={self.d_model})")
        a, g = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * F.silu(g))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}"
