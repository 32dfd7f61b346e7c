"""The copying task (Arjovsky et al., 2016; the Mamba paper's Fig. 2 left): remember a prefix of
``n_tokens`` data tokens across ``lag`` blank tokens, then reproduce them after a delimiter.

Layout of one sequence (``seqlen = 2 * n_tokens + lag``)::

    inputs : d1 d2 .. dn  _ _ .. _  | | .. |
    targets:  .  . ..  .  . . .. .  d1 d2 .. dn   (scored only here)

Token ids: 0 = blank, 1 = delimiter ``|``, 2.. = data. Because the data sits at fixed positions,
a time-invariant model (a fixed convolution of length >= seqlen) can solve it; compare
:mod:`ssmkit.tasks.selective_copying`, where it cannot.
"""

from __future__ import annotations

import dataclasses

import torch

from ssmkit.tasks.base import Batch, Task, check_batch_size, check_generator, make_batch, require

BLANK, DELIM, FIRST_DATA = 0, 1, 2


@dataclasses.dataclass
class Copying(Task):
    n_tokens: int = 16
    lag: int = 32
    vocab: int = 16  # total ids, specials included

    name = "copying"

    def __post_init__(self):
        require(self.n_tokens >= 1, f"n_tokens must be >= 1, got {self.n_tokens}")
        require(self.lag >= 0, f"lag must be >= 0, got {self.lag}")
        require(self.vocab >= FIRST_DATA + 2, f"vocab must be >= {FIRST_DATA + 2}, got {self.vocab}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def seqlen(self) -> int:
        return 2 * self.n_tokens + self.lag

    def with_seqlen(self, seqlen: int) -> Copying:
        lag = seqlen - 2 * self.n_tokens
        require(lag >= 0, f"seqlen must be >= 2 * n_tokens = {2 * self.n_tokens}, got {seqlen}")
        return dataclasses.replace(self, lag=lag)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        n, L = self.n_tokens, self.seqlen
        data = torch.randint(FIRST_DATA, self.vocab, (batch_size, n), generator=generator)
        inputs = torch.full((batch_size, L), BLANK, dtype=torch.long)
        inputs[:, :n] = data
        inputs[:, L - n :] = DELIM
        targets = torch.zeros_like(inputs)
        targets[:, L - n :] = data
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, L - n :] = True
        return make_batch(inputs, targets, mask)
