"""Feed-forward blocks: SwiGLU / GeGLU (Shazeer, 2020) and the non-gated squared ReLU (So et al., 2021).

* ``activation="swiglu"``: ``fc2(a * silu(g))`` with ``[a, g] = fc1(x)``. Parameter names follow
  ``mamba_ssm``'s ``GatedMLP`` (``fc1`` of shape ``(2 * hidden, d_model)`` whose first half is the
  value ``a`` and second half the gate ``g``; ``fc2``), so its checkpoints load without renaming.
* ``activation="geglu"``: the same with the exact (erf) GELU as the gate, ``fc2(a * gelu(g))``
  (Zamba2's shared MLPs).
* ``activation="relu2"``: ``fc2(relu(fc1(x))²)``, ``fc1`` of shape ``(hidden, d_model)`` (the MLP
  layers of Nemotron-H, "Primer"'s squared ReLU).

:class:`FeedForward` is the same MLP as a block's sequence mixer (layer letter ``F``): a block that
only transforms each position, with the mixer contract of :mod:`ssmkit.layers` and an empty state.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int, check_tensor
from ssmkit.layers.linear import Linear
from ssmkit.layers.state import LayerState

MLP_ACTIVATIONS = ("swiglu", "relu2", "geglu")


class MLP(nn.Module):
    """Feed-forward MLP: ``(..., d_model) -> (..., d_model)`` through ``hidden`` units."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, activation: str = "swiglu",
                 gate_multiplier: float = 1.0, down_multiplier: float = 1.0, device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
        self.d_model = d_model
        self.hidden = hidden
        self.activation = activation
        # Falcon-H1's scalings: the gate before its activation, the output (1.0: none)
        self.gate_multiplier, self.down_multiplier = float(gate_multiplier), float(down_multiplier)
        width = hidden if activation == "relu2" else 2 * hidden
        self.fc1 = Linear(d_model, width, bias=bias, device=device, dtype=dtype)
        self.fc2 = Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(*([None] * (x.dim() - 1)), self.d_model) if isinstance(x, torch.Tensor) else None,
                     desc=f"(..., d_model={self.d_model})")
        if self.activation == "relu2":
            return self.fc2(F.relu(self.fc1(x)).square())
        y = self.fc2(gated(self.fc1(x), self.activation, gate_multiplier=self.gate_multiplier))
        return y if self.down_multiplier == 1.0 else y * self.down_multiplier

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"


def gated(u: torch.Tensor, activation: str, *, gate_multiplier: float = 1.0) -> torch.Tensor:
    """``a * act(m * g)`` of a gated MLP's first projection ``u = [a, g]`` (``act``: silu for
    ``"swiglu"``, the exact GELU for ``"geglu"``; ``m``: Falcon-H1's gate multiplier)."""
    a, g = u.chunk(2, dim=-1)
    if gate_multiplier != 1.0:
        g = g * gate_multiplier
    return a * (F.gelu(g) if activation == "geglu" else F.silu(g))


@dataclasses.dataclass
class FeedForwardState(LayerState):
    """A feed-forward layer keeps nothing between tokens: a state without tensors."""


class FeedForward(MLP):
    """An :class:`MLP` as a block's mixer (layer letter ``F``): ``forward(x, state=None,
    return_state=False, cu_seqlens=None, mask=None)``, ``step(x_t, state)``, ``allocate_state``.
    Positions are independent, so masks and packed sequences change nothing."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, activation: str = "swiglu",
                 gate_multiplier: float = 1.0, down_multiplier: float = 1.0, layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__(d_model, hidden, bias=bias, activation=activation, gate_multiplier=gate_multiplier,
                         down_multiplier=down_multiplier, device=device, dtype=dtype)
        self.layer_idx = layer_idx

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> FeedForwardState:
        check_positive_int("batch_size", batch_size)
        return FeedForwardState()

    def forward(self, x: torch.Tensor, state: FeedForwardState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        check_tensor("x", x, 3, desc=f"(batch, seqlen, d_model={self.d_model})")
        if state is not None and not isinstance(state, FeedForwardState):
            raise TypeError(f"state must be a FeedForwardState, got {type(state).__name__}")
        y = super().forward(x)
        return (y, FeedForwardState()) if return_state else y

    def step(self, x_t: torch.Tensor, state: FeedForwardState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model) -> (batch, d_model)``."""
        return super().forward(x_t)
