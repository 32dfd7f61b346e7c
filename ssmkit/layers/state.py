"""Recurrent state objects shared by every mixer layer.

A layer's state is a dataclass of tensors (conv state, SSM state, KV cache, ...), allocated once
by ``layer.allocate_state(batch_size)`` and updated in place by ``layer.step``; ``forward(...,
return_state=True)`` returns a fresh one. SSM states are float32 even in bf16/fp16 models.
"""

from __future__ import annotations

import dataclasses

import torch

from ssmkit._checks import check_tensor
from ssmkit.ops import context_parallel as cp


@dataclasses.dataclass
class LayerState:
    """Base class: subclasses are dataclasses whose fields are tensors (or None)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self):
        return dataclasses.replace(self, **{k: v.clone() for k, v in self.tensors().items()})

    def copy_(self, other: LayerState):
        """Copy ``other`` into this state's buffers in place (keeps addresses, e.g. for CUDA graphs)."""
        for k, v in self.tensors().items():
            v.copy_(getattr(other, k))
        return self

    def zero_(self):
        for v in self.tensors().values():
            v.zero_()
        return self

    def index_select(self, index: torch.Tensor):
        """A new state keeping the batch rows in ``index`` (batch is dim 0 of every tensor)."""
        return dataclasses.replace(self, **{k: v.index_select(0, index) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str):
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def check_mixer_inputs(layer: torch.nn.Module, x, state, cu_seqlens, mask, state_cls) -> None:
    """Shape/type checks shared by the mixers' ``forward`` (Mamba, Mamba-2, DeltaNet)."""
    check_tensor("x", x, 3, desc=f"(batch, seqlen, d_model={layer.d_model})")
    if x.shape[-1] != layer.d_model:
        raise ValueError(f"x must have shape (batch, seqlen, d_model={layer.d_model}), got {tuple(x.shape)}")
    if state is not None and not isinstance(state, state_cls):
        raise TypeError(f"state must be a {state_cls.__name__} (from allocate_state), got {type(state).__name__}")
    if mask is not None:
        check_tensor("mask", mask, shape=tuple(x.shape[:2]), desc=f"(batch, seqlen) = {tuple(x.shape[:2])}",
                     floating=False)
        if cu_seqlens is not None:
            raise ValueError("pass either mask (padded batch) or cu_seqlens (packed batch), not both")


def check_step_inputs(layer: torch.nn.Module, x_t, state, state_cls, field: str) -> None:
    """Shape/type checks of a mixer's ``step``: ``x_t (batch, d_model)`` and a ``state_cls`` state
    whose tensor ``field`` has as many rows."""
    check_tensor("x_t", x_t, 2, desc=f"(batch, d_model={layer.d_model})")
    if x_t.shape[-1] != layer.d_model:
        raise ValueError(f"x_t must have shape (batch, d_model={layer.d_model}), got {tuple(x_t.shape)}")
    if not isinstance(state, state_cls):
        raise TypeError(f"state must be a {state_cls.__name__} (from allocate_state), got {type(state).__name__}")
    if getattr(state, field).shape[0] != x_t.shape[0]:
        raise ValueError(f"x_t has batch {x_t.shape[0]} but state has batch {getattr(state, field).shape[0]}")


def context_parallel_group(layer: torch.nn.Module, state, mask=None):
    """The layer's context-parallel group (its ``context_parallel`` attribute; None: off, or a
    group of one rank).

    Under context parallelism ``x`` is this rank's shard of the sequence, which starts from a zero
    state on the group's first rank: no ``state`` to continue from, and no padding ``mask``
    (pack sequences with ``cu_seqlens`` instead)."""
    group = getattr(layer, "context_parallel", None)
    if group is not None and cp.group_size(group) == 1:
        return None  # a group of one rank: the plain path, exactly
    if group is not None:
        name = type(layer).__name__
        if state is not None:
            raise ValueError(f"{name}: state cannot be combined with context parallelism "
                             "(the sharded sequence starts from a zero state on the first rank)")
        if mask is not None:
            raise ValueError(f"{name}: mask cannot be combined with context parallelism; "
                             "pack the sequences with cu_seqlens")
    return group
