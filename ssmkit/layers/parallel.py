"""Mamba-2 and attention side by side on the same input (layer letter ``P``, Falcon-H1's mixer).

    y = ssm_out_multiplier * mamba(x) + attn_out_multiplier * attn(attn_in_multiplier * x)

Both branches read the block's normed input; their outputs are added before the residual add
(Falcon-H1, Zuo et al., 2025). ``mamba`` is a :class:`~ssmkit.layers.mamba2.Mamba2` (its own
input / projection multipliers among its settings), ``attn`` an
:class:`~ssmkit.layers.attention.Attention`; the state holds one of each.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ssmkit.layers.attention import Attention, KVCacheState, normalize_attn_cfg
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.state import LayerState


@dataclasses.dataclass
class ParallelState(LayerState):
    """The Mamba-2 state and the KV cache of a :class:`ParallelHybrid` layer."""

    ssm: Mamba2State
    kv: KVCacheState

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"ssm.{k}": v for k, v in self.ssm.tensors().items()},
                **{f"kv.{k}": v for k, v in self.kv.tensors().items()}}

    def clone(self):
        return ParallelState(self.ssm.clone(), self.kv.clone())

    def copy_(self, other: ParallelState):
        self.ssm.copy_(other.ssm)
        self.kv.copy_(other.kv)
        return self

    def index_select(self, index: torch.Tensor):
        return ParallelState(self.ssm.index_select(index), self.kv.index_select(index))

    def to(self, device: torch.device | str):
        return ParallelState(self.ssm.to(device), self.kv.to(device))

    @property
    def max_seqlen(self) -> int:
        return self.kv.max_seqlen

    def bytes_per_slot(self) -> int:
        return self.kv.bytes_per_slot()


class ParallelHybrid(nn.Module):
    """``(batch, seqlen, d_model) -> (batch, seqlen, d_model)``: Mamba-2 plus attention.

    ``mamba``: keyword arguments of :class:`Mamba2`; ``attn``: of :class:`Attention` (mamba_ssm
    spellings accepted). The multipliers scale the attention input and each branch's output.
    """

    def __init__(self, d_model: int, mamba: dict | None = None, attn: dict | None = None,
                 attn_in_multiplier: float = 1.0, attn_out_multiplier: float = 1.0,
                 ssm_out_multiplier: float = 1.0, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.mamba = Mamba2(d_model, **dict(mamba or {}), layer_idx=layer_idx, device=device, dtype=dtype)
        self.attn = Attention(d_model, **normalize_attn_cfg(dict(attn or {})), layer_idx=layer_idx,
                              device=device, dtype=dtype)
        self.attn_in_multiplier = float(attn_in_multiplier)
        self.attn_out_multiplier = float(attn_out_multiplier)
        self.ssm_out_multiplier = float(ssm_out_multiplier)

    def allocate_state(self, batch_size: int, device=None, dtype=None, max_seqlen: int | None = None) -> ParallelState:
        return ParallelState(self.mamba.allocate_state(batch_size, device=device, dtype=dtype),
                             self.attn.allocate_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen))

    def _combine(self, y_ssm: torch.Tensor, y_attn: torch.Tensor) -> torch.Tensor:
        if self.ssm_out_multiplier != 1.0:
            y_ssm = y_ssm * self.ssm_out_multiplier
        if self.attn_out_multiplier != 1.0:
            y_attn = y_attn * self.attn_out_multiplier
        return y_ssm + y_attn

    def _attn_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.attn_in_multiplier == 1.0 else x * self.attn_in_multiplier

    def forward(self, x: torch.Tensor, state: ParallelState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if state is not None and not isinstance(state, ParallelState):
            raise TypeError(f"state must be a ParallelState, got {type(state).__name__}")
        kw = {"cu_seqlens": cu_seqlens, "mask": mask}
        if state is None and not return_state:
            return self._combine(self.mamba(x, **kw), self.attn(self._attn_in(x), **kw))
        ys, ss = self.mamba(x, state=None if state is None else state.ssm, return_state=True, **kw)
        ya, sa = self.attn(self._attn_in(x), state=None if state is None else state.kv, return_state=True, **kw)
        return self._combine(ys, ya), ParallelState(ss, sa)

    def step(self, x_t: torch.Tensor, state: ParallelState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model)``; updates ``state`` in place."""
        return self._combine(self.mamba.step(x_t, state.ssm), self.attn.step(self._attn_in(x_t), state.kv))

    def extra_repr(self) -> str:
        return (f"attn_in_multiplier={self.attn_in_multiplier}, attn_out_multiplier={self.attn_out_multiplier}, "
                f"ssm_out_multiplier={self.ssm_out_multiplier}")
