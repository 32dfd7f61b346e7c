"""Multi-query associative recall, MQAR (Arora et al., 2023, "Zoology").

A context of ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` is followed by a query region
in which every key appears again (in random order, at random positions, each followed by its
value); at each query key the model must predict its value. Recall capacity grows with the
model's state size, which is what Zoology measures.

Layout::

    inputs : k1 v1 k2 v2 .. kn vn  0 k2 v2 0 0 k1 v1 ..
    targets:                         v2          v1     (scored at the query keys)

Token ids: 0 = filler, keys from [1, vocab/2), values from [vocab/2, vocab). Query positions are
uniform over the query region (Zoology draws them from a power law; uniform is harder on
average). Keys within one sequence are distinct.
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


@dataclasses.dataclass
class MQAR(Task):
    length: int = 256
    num_kv_pairs: int = 16
    vocab: int = 256

    name = "mqar"

    def __post_init__(self):
        n = self.num_kv_pairs
        require(n >= 1, f"num_kv_pairs must be >= 1, got {n}")
        require(self.vocab >= 4, f"vocab must be >= 4, got {self.vocab}")
        require(
            self.vocab // 2 - 1 >= n,
            f"vocab must give at least num_kv_pairs={n} distinct keys (vocab//2 - 1 >= {n}), got {self.vocab}",
        )
        require(self.length >= 4 * n, f"length must be >= 4 * num_kv_pairs = {4 * n}, got {self.length}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def seqlen(self) -> int:
        return self.length

    def with_seqlen(self, seqlen: int) -> MQAR:
        return dataclasses.replace(self, length=seqlen)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        B, L, n = batch_size, self.length, self.num_kv_pairs
        half = self.vocab // 2
        # Distinct keys: the first n of a random permutation of [1, half).
        keys = torch.rand(B, half - 1, generator=generator).argsort(-1)[:, :n] + 1
        values = torch.randint(half, self.vocab, (B, n), generator=generator)
        inputs = torch.zeros(B, L, dtype=torch.long)
        inputs[:, 0 : 2 * n : 2] = keys
        inputs[:, 1 : 2 * n : 2] = values
        # Query slots: pairs of positions (2j, 2j+1) inside the query region, so a query key and
        # the value that follows it never overlap another query.
        ctx = 2 * n
        n_slots = (L - ctx) // 2
        slots = random_positions(B, n_slots, n, generator)  # (B, n) sorted
        order = torch.rand(B, n, generator=generator).argsort(-1)  # which pair goes in each slot
        qk = keys.gather(1, order)
        qv = values.gather(1, order)
        qpos = ctx + 2 * slots
        inputs.scatter_(1, qpos, qk)
        inputs.scatter_(1, qpos + 1, qv)
        targets = torch.zeros_like(inputs)
        targets.scatter_(1, qpos, qv)
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask.scatter_(1, qpos, True)
        return make_batch(inputs, targets, mask)
