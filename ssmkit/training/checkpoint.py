"""Atomic training checkpoints.

A checkpoint is one file ``checkpoint-<step>.pt`` holding the model, optimizer and schedule
state, the step, every RNG state (torch CPU/CUDA, Python, NumPy) and the data position (the
state of the data generator), so that resuming reproduces the uninterrupted run bit for bit on
the CPU in deterministic mode.

Writes are atomic: the data goes to a temporary file in the same directory, is flushed and
fsync'ed, then renamed over the final name (``os.replace`` is atomic on POSIX), and the directory
is fsync'ed. A process killed at any point leaves either the old set of checkpoints or the new
one, plus at worst a stray ``*.tmp`` file that loading ignores. The newest ``keep`` checkpoints
are kept (default 2, i.e. the previous one survives while the next is written), and
:func:`load_latest` falls back to the previous one if the newest cannot be read.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")

# Test hook: called after the temporary file is written and fsync'ed, before the rename
# (a failure injected here must leave the previous checkpoint loadable).
_before_rename: Callable[[Path], None] | None = None


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if _before_rename is not None:
            _before_rename(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def rng_state() -> dict:
    """Every RNG the training loop may touch, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` (plus RNG states) as the checkpoint of ``step``; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    state = {**state, "step": step, "rng": rng_state(), "format": "ssmkit-train-1"}
    path = atomic_save(state, checkpoint_path(directory, step))
    for _, old in list_checkpoints(directory)[:-keep]:
        try:
            old.unlink()
        except FileNotFoundError:  # pragma: no cover - another process removed it
            pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read one checkpoint (tensors and plain containers only: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read: truncated, corrupted, or not written by ssmkit "
                         f"train ({type(e).__name__}: {_reason(e)}); nothing in it was executed") from e
    if not isinstance(state, dict) or state.get("format") != "ssmkit-train-1":
        raise ValueError(f"{path} is not an ssmkit training checkpoint")
    return state


def _reason(e: Exception) -> str:
    """The informative line of a load error: torch's ``weights_only`` failures bury it after advice."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "Weights only load failed" in str(e):
        after = [ln for ln in lines[1:] if not ln.startswith(("Please file", "Check the documentation"))]
        return after[0] if after else "not a plain tensor checkpoint"
    return lines[0] if lines else "unreadable"


def load_latest(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest readable checkpoint in ``directory`` (skipping unreadable ones), or None."""
    for _step, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, map_location)
        except ValueError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    return None
