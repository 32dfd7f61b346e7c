"""Byte-level language modelling on any text files: every byte is a token (vocab 256).

:class:`ByteCorpus` reads files (or directories of files) into one byte stream and serves random
windows of ``seqlen + 1`` bytes through the same interface as the synthetic tasks
(``sample(batch_size, generator) -> Batch``), so the trainer treats both alike. The last
``val_fraction`` of the stream is held out; ``corpus.split("val")`` samples from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from ssmkit.tasks.base import Batch, Task, check_batch_size, check_generator, make_batch, masked_cross_entropy

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tsv", ".html", ".xml", ".tex", ".c",
                 ".h", ".cpp", ".js", ".ts", ".yaml", ".yml", ".toml"}


def _expand(paths: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    return files


def read_bytes(paths: list[str | os.PathLike]) -> torch.Tensor:
    """All bytes of ``paths`` (files or directories), files separated by a newline: uint8 (n,)."""
    files = _expand(list(paths))
    if not files:
        raise ValueError(f"no text files found in {', '.join(map(str, paths))}")
    chunks = []
    for f in files:
        chunks.append(f.read_bytes())
    data = b"\n".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclasses.dataclass
class ByteCorpus(Task):
    paths: list[str]
    length: int = 256
    val_fraction: float = 0.05
    which: str = "train"

    name = "bytes"

    def __post_init__(self):
        if not isinstance(self.paths, (list, tuple)) or not self.paths:
            raise ValueError("paths must be a non-empty list of files or directories")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.which not in ("train", "val"):
            raise ValueError(f"which must be 'train' or 'val', got {self.which!r}")
        self.paths = [str(p) for p in self.paths]
        self._data = read_bytes(self.paths)
        n = self._data.numel()
        n_val = math.ceil(n * self.val_fraction) if self.val_fraction > 0 else 0
        self._bounds = {"train": (0, n - n_val), "val": (n - n_val, n) if n_val else (0, n - n_val)}
        lo, hi = self._bounds[self.which]
        if hi - lo < self.length + 1:
            raise ValueError(
                f"the {self.which} split has {hi - lo} bytes, fewer than seqlen + 1 = {self.length + 1}: "
                "use more text or a shorter --seqlen"
            )

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def seqlen(self) -> int:
        return self.length

    @property
    def n_bytes(self) -> int:
        lo, hi = self._bounds[self.which]
        return hi - lo

    def split(self, which: str) -> ByteCorpus:
        if which not in ("train", "val"):
            raise ValueError(f"which must be 'train' or 'val', got {which!r}")
        return self._view(which=which)

    def with_seqlen(self, seqlen: int) -> ByteCorpus:
        return self._view(length=seqlen)

    def _view(self, **changes) -> ByteCorpus:
        # Share the bytes instead of re-reading the files.
        new = object.__new__(ByteCorpus)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        lo, hi = new._bounds[new.which]
        if hi - lo < new.length + 1:
            raise ValueError(f"the {new.which} split has {hi - lo} bytes, fewer than seqlen + 1 = {new.length + 1}")
        return new

    def config(self) -> dict:
        return {"name": self.name, "paths": self.paths, "length": self.length, "val_fraction": self.val_fraction}

    def describe(self) -> str:
        return f"bytes({len(self.paths)} path(s), {self.n_bytes} {self.which} bytes, seqlen={self.length})"

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        check_batch_size(batch_size)
        check_generator(generator)
        lo, hi = self._bounds[self.which]
        starts = torch.randint(lo, hi - self.length, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(self.length + 1)
        win = self._data[idx].long()
        inputs, targets = win[:, :-1], win[:, 1:]
        return make_batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool))

    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        out = super().metric(logits, batch)
        out["bits_per_byte"] = float(masked_cross_entropy(logits, batch)) / math.log(2)
        return out
