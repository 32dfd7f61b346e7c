"""Count the kernel launches of one decode step without a GPU (what CUDA-graph decoding replays).

At batch 1 a decode step is bound by launch latency (each kernel costs ~2-4 us even inside a CUDA
graph), so the number of kernels per layer is the figure to watch. :func:`count_step_launches`
runs ``model.step`` once under a ``TorchDispatchMode`` and counts:

* every aten op that writes memory: in-place ops and ops whose output is new storage (views,
  allocations and no-op casts such as ``x.to(x.dtype)`` are free);
* every call of a registered ``"triton"`` form (:mod:`ssmkit.ops.dispatch`) as one launch, and
  nothing for the ops it runs inside (on CPU those are the Triton interpreter's, not kernels).

With ``backend="triton"`` on CPU (Triton interpreter) this counts what the CUDA path issues;
matmuls count one launch each (cuBLAS may split a GEMV in two).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmkit.ops import dispatch

__all__ = ["count_step_launches"]


def _storages(obj, out: set[int]) -> set[int]:
    if isinstance(obj, torch.Tensor):
        out.add(obj.untyped_storage().data_ptr())
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _storages(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _storages(o, out)
    return out


class _LaunchCounter(TorchDispatchMode):
    """Counts memory-writing aten ops by name; ``paused`` while a Triton form runs."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.paused or name.startswith(("empty", "new_empty")):
            return out
        new = _storages(out, set()) - _storages(args, set()) - _storages(kwargs, set())
        if name.endswith("_") or new:
            self.counts[name] += 1
        return out


@contextlib.contextmanager
def _count_triton_forms(counter: _LaunchCounter) -> Iterator[None]:
    """Swap every registered Triton form for a wrapper that counts it as one launch."""
    saved = {}
    for op, forms in dispatch._registry.items():
        fn = forms.get("triton")
        if fn is None:
            continue

        def wrapper(*args, __fn=fn, __op=op, **kwargs):
            counter.counts[f"triton:{__op}"] += 1
            counter.paused += 1
            try:
                return __fn(*args, **kwargs)
            finally:
                counter.paused -= 1

        wrapper.__dict__.update(fn.__dict__)  # e.g. ``fuses_dt_proj``
        saved[op] = fn
        forms["triton"] = wrapper
    try:
        yield
    finally:
        for op, fn in saved.items():
            dispatch._registry[op]["triton"] = fn


@torch.inference_mode()
def count_step_launches(model, cache, backend: str | None = None) -> collections.Counter:
    """Kernel launches of one ``model.step`` on ``cache`` (advanced by one token), by op name.

    ``backend``: as :func:`ssmkit.ops.dispatch.force_backend` (``"triton"`` on CPU counts the CUDA
    path under the Triton interpreter). Returns a Counter; ``sum(c.values())`` is the total.
    """
    token = torch.zeros(cache.batch_size, dtype=torch.long, device=model.device)
    counter = _LaunchCounter()
    with dispatch.force_backend(backend), _count_triton_forms(counter), counter:
        model.step(token, cache)
    cache.advance(1)
    return counter.counts
