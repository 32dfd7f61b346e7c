"""ListOps (Nangia & Bowman, 2018), as generated for the Long Range Arena (Tay et al., 2021).

Nested prefix expressions over the digits 0-9 with the operators MAX, MIN, MED (median) and SM
(sum modulo 10), e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9. The answer is one of ten classes. A causal
model reads the expression and must output the value at the last token of the expression (the
closing bracket); the rest of the sequence is padding.

The generator follows the LRA recipe: a node becomes a leaf digit with probability 0.75 (always
at ``max_depth``), else an operator with 2..``max_args`` children; expressions whose token count
falls outside ``[min_length, max_length]`` are redrawn. LRA uses max_depth 10, max_args 10 and
lengths 500-2000 padded to 2048; the defaults here are smaller so that sampling and CPU training
stay quick (``ListOps(max_depth=10, max_args=10, min_length=500, max_length=2000, length=2048)``
gives the LRA sizes).

Token ids: 0 = pad, 1..10 = digits 0..9, 11 ``[MAX``, 12 ``[MIN``, 13 ``[MED``, 14 ``[SM``,
15 ``]``. Targets are digit tokens (1..10).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from ssmkit.tasks.base import Batch, Task, check_batch_size, check_generator, make_batch, require

PAD = 0
DIGIT0 = 1
OPS = ("MAX", "MIN", "MED", "SM")
OP_ID = {op: 11 + i for i, op in enumerate(OPS)}
CLOSE = 15
VOCAB = 16
LEAF_PROB = 0.75


def _gen_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    if depth >= max_depth or rng.random() < LEAF_PROB:
        return rng.randrange(10)
    n = rng.randint(2, max_args)
    return (rng.choice(OPS), [_gen_tree(rng, depth + 1, max_depth, max_args) for _ in range(n)])


def evaluate(tree) -> int:
    """Value of an expression tree (an int leaf or ``(op, children)``)."""
    if isinstance(tree, int):
        return tree
    op, kids = tree
    vals = [evaluate(k) for k in kids]
    if op == "MAX":
        return max(vals)
    if op == "MIN":
        return min(vals)
    if op == "MED":
        return int(sorted(vals)[len(vals) // 2])
    return sum(vals) % 10


def tokens(tree) -> list[int]:
    """Token ids of an expression tree."""
    if isinstance(tree, int):
        return [DIGIT0 + tree]
    op, kids = tree
    out = [OP_ID[op]]
    for k in kids:
        out += tokens(k)
    out.append(CLOSE)
    return out


def to_text(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, kids = tree
    return f"[{op} " + " ".join(to_text(k) for k in kids) + " ]"


@dataclasses.dataclass
class ListOps(Task):
    length: int = 256  # padded sequence length
    max_depth: int = 6
    max_args: int = 5
    min_length: int = 16
    max_length: int = 256
    max_tries: int = 10000

    name = "listops"

    def __post_init__(self):
        require(self.max_depth >= 1, f"max_depth must be >= 1, got {self.max_depth}")
        require(self.max_args >= 2, f"max_args must be >= 2, got {self.max_args}")
        require(
            1 <= self.min_length <= self.max_length <= self.length,
            "need 1 <= min_length <= max_length <= length, got "
            f"{self.min_length}, {self.max_length}, {self.length}",
        )

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def seqlen(self) -> int:
        return self.length

    def sample_tree(self, rng: random.Random):
        for _ in range(self.max_tries):
            tree = _gen_tree(rng, 1, self.max_depth, self.max_args)
            n = len(tokens(tree))
            if self.min_length <= n <= self.max_length:
                return tree
        raise ValueError(
            f"no expression of length in [{self.min_length}, {self.max_length}] found in {self.max_tries} "
            f"tries with max_depth={self.max_depth}, max_args={self.max_args}: widen the length range"
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        # One Python RNG per batch, seeded from the torch generator: the batch stays a function of
        # the generator state alone.
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        inputs = torch.full((batch_size, self.length), PAD, dtype=torch.long)
        targets = torch.zeros_like(inputs)
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        for b in range(batch_size):
            tree = self.sample_tree(rng)
            toks = tokens(tree)
            inputs[b, : len(toks)] = torch.tensor(toks)
            targets[b, len(toks) - 1] = DIGIT0 + evaluate(tree)
            mask[b, len(toks) - 1] = True
        return make_batch(inputs, targets, mask)
