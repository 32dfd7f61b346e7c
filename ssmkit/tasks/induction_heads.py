"""Induction heads (Olsson et al., 2022; the Mamba paper, Sec. 4.1.2, Table 2 / Fig. 5).

A random sequence of data tokens contains one special trigger token followed by a value token;
the sequence ends with the trigger again, and the model must output the value: an associative
recall ("... t v ... t -> v") that requires finding the earlier trigger by content. Trained at one
length, a model is evaluated at lengths far beyond it; Mamba keeps 100% up to 2^20 tokens,
attention with RoPE fails past about 2x the training length.

Layout (one scored position, the last one)::

    inputs : a b c t v d e .. f t
    targets:                    v

Token ids: 0 = trigger, 1..vocab-1 = data (the paper: vocab 16, training length 256). The trigger
occurs exactly twice: once before the value, once at the end.
"""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.tasks.base import Batch, Task, check_batch_size, check_generator, make_batch, require

TRIGGER, FIRST_DATA = 0, 1


@dataclasses.dataclass
class InductionHeads(Task):
    length: int = 256
    vocab: int = 16  # total ids, the trigger included

    name = "induction-heads"

    def __post_init__(self):
        require(self.length >= 4, f"length must be >= 4, got {self.length}")
        require(self.vocab >= FIRST_DATA + 2, f"vocab must be >= {FIRST_DATA + 2}, got {self.vocab}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def seqlen(self) -> int:
        return self.length

    def with_seqlen(self, seqlen: int) -> InductionHeads:
        return dataclasses.replace(self, length=seqlen)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        B, L = batch_size, self.length
        inputs = torch.randint(FIRST_DATA, self.vocab, (B, L), generator=generator)
        # Trigger at p in [0, L-3] so the value (p+1) lies strictly before the final trigger.
        p = torch.randint(0, L - 2, (B,), generator=generator)
        rows = torch.arange(B)
        inputs[rows, p] = TRIGGER
        inputs[:, L - 1] = TRIGGER
        value = inputs[rows, p + 1]
        targets = torch.zeros_like(inputs)
        targets[:, L - 1] = value
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, L - 1] = True
        return make_batch(inputs, targets, mask)
