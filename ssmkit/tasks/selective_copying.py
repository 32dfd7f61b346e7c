"""Selective copying (Jing et al., 2019; the Mamba paper, Sec. 4.1.1, Table 1).

``n_tokens`` data tokens are scattered at random positions among noise tokens; after them come
``n_tokens`` delimiter tokens, at which the model must output the data tokens in order. Because
the spacing is random, solving it needs *content-aware* reasoning: a time-invariant SSM (a fixed
convolution) cannot ignore the noise, a selective SSM can (Mamba paper, Fig. 2).

Layout (``seqlen`` = total length; the first ``seqlen - n_tokens`` positions hold noise + data)::

    inputs : _ d1 _ _ d2 _ .. dn _  | | .. |
    targets:                        d1 d2 .. dn   (scored only here)

Token ids: 0 = noise, 1 = delimiter, 2..vocab-1 = data. The paper uses vocab 16, 16 tokens to
memorise and length 4096.
"""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.tasks.base import (
    Batch,
    Task,
    check_batch_size,
    check_generator,
    make_batch,
    random_positions,
    require,
)

NOISE, DELIM, FIRST_DATA = 0, 1, 2


@dataclasses.dataclass
class SelectiveCopying(Task):
    length: int = 4096  # total sequence length
    n_tokens: int = 16
    vocab: int = 16  # total ids, specials included

    name = "selective-copying"

    def __post_init__(self):
        require(self.n_tokens >= 1, f"n_tokens must be >= 1, got {self.n_tokens}")
        require(self.vocab >= FIRST_DATA + 2, f"vocab must be >= {FIRST_DATA + 2}, got {self.vocab}")
        require(
            self.length >= 2 * self.n_tokens,
            f"length must be >= 2 * n_tokens = {2 * self.n_tokens}, got {self.length}",
        )

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def seqlen(self) -> int:
        return self.length

    def with_seqlen(self, seqlen: int) -> SelectiveCopying:
        return dataclasses.replace(self, length=seqlen)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        n, L = self.n_tokens, self.length
        region = L - n
        data = torch.randint(FIRST_DATA, self.vocab, (batch_size, n), generator=generator)
        pos = random_positions(batch_size, region, n, generator)
        inputs = torch.full((batch_size, L), NOISE, dtype=torch.long)
        inputs[:, :region].scatter_(1, pos, data)
        inputs[:, region:] = DELIM
        targets = torch.zeros_like(inputs)
        targets[:, region:] = data
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, region:] = True
        return make_batch(inputs, targets, mask)
