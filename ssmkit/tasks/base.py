"""One interface for every synthetic task: sample a batch from a seeded generator, score logits.

A task produces token sequences for a causal model. ``targets[b, t]`` is what the model should
predict *at* position ``t`` (after reading ``inputs[b, :t+1]``), and ``loss_mask[b, t]`` says
whether position ``t`` is scored. Both the training loss and the metric use only masked positions,
so a task decides what counts (e.g. only the final answer token for induction heads).

Randomness comes only from the ``torch.Generator`` passed to :meth:`Task.sample`, so a batch is a
pure function of the generator's state: the same seed gives the same data on every machine, and a
trainer can checkpoint the data position by saving the generator state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ssmkit._checks import check_positive_int

IGNORE_INDEX = -100


@dataclasses.dataclass
class Batch:
    """A batch of task data, all ``(batch, seqlen)``.

    inputs: int64 token ids. targets: int64 token ids (``IGNORE_INDEX`` where unscored).
    loss_mask: bool, True where the position is scored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device))

    def __getitem__(self, idx) -> Batch:
        """Rows ``idx`` of the batch (a slice or index tensor)."""
        return Batch(self.inputs[idx], self.targets[idx], self.loss_mask[idx])

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_scored(self) -> int:
        return int(self.loss_mask.sum())


def make_batch(inputs: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> Batch:
    """Build a :class:`Batch`, writing ``IGNORE_INDEX`` into unscored target positions."""
    loss_mask = loss_mask.bool()
    targets = torch.where(loss_mask, targets, torch.full_like(targets, IGNORE_INDEX))
    return Batch(inputs.long(), targets.long(), loss_mask)


def masked_cross_entropy(logits: torch.Tensor, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over the scored positions. logits: (batch, seqlen, vocab).

    ``reduction="sum"`` returns the summed loss (the trainer divides by the global number of
    scored tokens so accumulation and data parallelism give the same gradient as one big batch).
    """
    V = logits.shape[-1]
    loss = F.cross_entropy(
        logits.reshape(-1, V).float(), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return loss
    return loss / max(batch.n_scored, 1)


@torch.no_grad()
def token_accuracy_tensors(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[correct scored tokens, scored tokens, fully-correct sequences]`` as an int64 tensor (3,)
    on ``logits``' device: callers that accumulate over many batches read it back once, instead
    of synchronising with the GPU after every batch."""
    pred = logits.argmax(-1)
    hit = (pred == batch.targets) & batch.loss_mask
    per_seq_ok = (hit | ~batch.loss_mask).all(-1)
    return torch.stack([hit.sum(), batch.loss_mask.sum(), per_seq_ok.sum()])


@torch.no_grad()
def token_accuracy_counts(logits: torch.Tensor, batch: Batch) -> dict[str, int]:
    """Counts for accuracy: correct scored tokens, scored tokens, fully-correct sequences, sequences."""
    correct, total, seq_correct = token_accuracy_tensors(logits, batch).tolist()
    return {"correct": correct, "total": total, "seq_correct": seq_correct, "seqs": int(batch.inputs.shape[0])}


class Task(ABC):
    """A synthetic sequence task.

    Subclasses are dataclasses with their sizes as fields and set ``name``. They implement
    :meth:`sample`; the default metric is token accuracy over scored positions (the Mamba paper's
    accuracy for selective copying and induction heads), plus whole-sequence accuracy.
    """

    name: str = "task"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids the inputs and targets use (ids are 0..vocab_size-1)."""

    @property
    @abstractmethod
    def seqlen(self) -> int:
        """Length of every sequence this task produces."""

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` sequences using only ``generator`` for randomness (CPU tensors)."""

    def with_seqlen(self, seqlen: int) -> Task:
        """The same task at another sequence length (for length-generalisation evaluation)."""
        raise ValueError(f"task {self.name!r} has no variable length")

    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Accuracy of ``logits`` (batch, seqlen, vocab) on ``batch``: token and sequence level."""
        c = token_accuracy_counts(logits, batch)
        return {"acc": c["correct"] / max(c["total"], 1), "seq_acc": c["seq_correct"] / max(c["seqs"], 1)}

    def describe(self) -> str:
        """One line with the sizes, for tables and logs."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"

    def config(self) -> dict:
        return {"name": self.name, **(dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {})}


def check_generator(generator: object) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got device {generator.device}")


def check_batch_size(batch_size: object) -> None:
    check_positive_int("batch_size", batch_size)


def require(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond`` (task-size validation)."""
    if not cond:
        raise ValueError(msg)


def random_positions(batch: int, length: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct sorted positions in ``[0, length)`` per row: (batch, k) int64."""
    scores = torch.rand(batch, length, generator=generator)
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values
