"""The decoding cache: every layer's state, allocated once and updated in place.

SSM layers (Mamba, Mamba-2, DeltaNet, S4D) keep a fixed-size state (conv window + SSM state,
float32), so an SSM-only model's cache does not grow with the number of tokens; attention layers
keep a KV cache with ``max_seqlen`` preallocated slots, the only part that depends on length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmkit._checks import check_positive_int
from ssmkit.layers.state import LayerState


@dataclass
class InferenceCache:
    """Per-layer states of a :class:`~ssmkit.LanguageModel` plus bookkeeping.

    states: one :class:`LayerState` per layer. max_seqlen: KV capacity (prompt + new tokens).
    seqlen_offset: tokens (incl. padding) consumed so far by ``prefill``/``forward``; ``decode``
    steps advance it on the host without reading the device.
    """

    states: list[LayerState]
    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0

    def nbytes(self) -> int:
        """Bytes held by all layers' state tensors (what decoding keeps in memory)."""
        return sum(s.nbytes() for s in self.states)

    def advance(self, n: int) -> None:
        self.seqlen_offset += int(n)

    def reset(self) -> InferenceCache:
        """Zero every buffer in place (reuse the allocation for a new prompt)."""
        for s in self.states:
            s.zero_()
        self.seqlen_offset = 0
        return self

    def clone(self) -> InferenceCache:
        return InferenceCache([s.clone() for s in self.states], self.batch_size, self.max_seqlen,
                              self.seqlen_offset)

    def copy_(self, other: InferenceCache) -> InferenceCache:
        for a, b in zip(self.states, other.states):
            a.copy_(b)
        self.seqlen_offset = other.seqlen_offset
        return self

    def data_ptrs(self) -> list[int]:
        """Addresses of every buffer (stay fixed while decoding: what CUDA graphs need)."""
        return [t.data_ptr() for s in self.states for t in s.tensors().values()]


def allocate_cache(model, batch_size: int, max_seqlen: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> InferenceCache:
    """Allocate a zeroed cache for ``model`` (a :class:`~ssmkit.LanguageModel`).

    ``max_seqlen`` bounds prompt + generated tokens for attention layers; SSM layers ignore it.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_seqlen", max_seqlen)
    states = model.allocate_states(batch_size, max_seqlen, device=device, dtype=dtype)
    return InferenceCache(states=states, batch_size=batch_size, max_seqlen=max_seqlen)
