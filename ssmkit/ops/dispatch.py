"""Backend dispatch: every op exposes ``backend="auto" | "reference" | "chunked" | "triton"``.

Each op registers its forms under one name::

    @register("selective_scan", "reference")
    def selective_scan_reference(...): ...

and its public entry point calls ``get(op, backend, *tensors)`` to pick one.

``"auto"`` picks the fastest form available for the tensors' device: Triton on CUDA when Triton
is installed and the op has a Triton form, else ``"chunked"``, else ``"reference"``. A form
registered with ``auto=False`` (correct, but not yet measured faster than the form it would
replace) is only used when named or forced. Tests and
users can override what ``"auto"`` means with :func:`force_backend` (a context manager) or the
environment variable ``SSMKIT_BACKEND``; an explicit ``backend=`` argument always wins.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "chunked", "triton")
# Forms that are not in BACKENDS but that an op may register for tests (e.g. SSD's "quadratic").
_registry: dict[str, dict[str, Callable]] = {}
_not_auto: set[tuple[str, str]] = set()  # (op, backend) forms that "auto" passes over
_local = threading.local()


def register(op: str, backend: str, *, auto: bool = True) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as the ``backend`` form of ``op``; ``auto=False``: only
    used when asked for by name or forced (:func:`force_backend`, ``SSMKIT_BACKEND``)."""
    if backend == "auto":
        raise ValueError("backend 'auto' is chosen at call time and cannot be registered")

    def deco(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        (_not_auto.discard if auto else _not_auto.add)((op, backend))
        return fn

    return deco


def available(op: str) -> list[str]:
    """Names of the registered forms of ``op``."""
    return sorted(_registry.get(op, {}))


# (looked up once at import: a cached call would still be traced by torch.compile, which cannot
# trace importlib)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def force_backend(backend: str | None) -> Iterator[None]:
    """Make ``backend="auto"`` resolve to ``backend`` inside the block (``None`` restores auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = backend
    try:
        yield
    finally:
        _local.forced = prev


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputation resolves
    ``"auto"`` as the forward did. :func:`force_backend` is per thread and autograd runs a CUDA
    backward (and so the recomputation) on a thread of its own."""
    return contextlib.nullcontext(), force_backend(getattr(_local, "forced", None))


def _auto(op: str, forms: dict[str, Callable], device: torch.device | None) -> str:
    forced = getattr(_local, "forced", None) or os.environ.get("SSMKIT_BACKEND") or None
    if forced and forced != "auto":
        if forced in forms:
            return forced
        # A forced form this op lacks falls back to the usual choice (e.g. "triton" for an op
        # that has only CPU forms), so one switch can cover a whole model.
    if (device is not None and device.type == "cuda" and triton_installed() and "triton" in forms
            and (op, "triton") not in _not_auto):
        return "triton"
    if "chunked" in forms:
        return "chunked"
    return "reference"


def get(op: str, backend: str = "auto", *tensors: torch.Tensor | None) -> Callable:
    """Return the ``backend`` form of ``op``, resolving ``"auto"`` from the tensors' device."""
    forms = _registry.get(op)
    if not forms:
        raise KeyError(f"no op named {op!r} is registered (known: {sorted(_registry)})")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
        backend = _auto(op, forms, device)
    if backend not in forms:
        raise ValueError(
            f"backend={backend!r} is not available for {op}: choose one of "
            f"{['auto', *sorted(forms)]}"
        )
    if backend == "triton" and not triton_installed():
        raise ValueError(f"backend='triton' for {op} needs triton: pip install 'ssmkit[gpu]'")
    return forms[backend]


# Programmatic dependent launch (Hopper and newer): a decode kernel launched with it may start
# while the kernel before it finishes, loading its weights early, and waits (griddepcontrol.wait)
# before it reads that kernel's results. SSMKIT_PDL=0 turns it off.
PDL = os.environ.get("SSMKIT_PDL", "1") != "0"
_PDL_DEVICES: dict[int, bool] = {}


def programmatic_launch(t: torch.Tensor) -> bool:
    """Whether Triton kernels reading ``t`` launch with programmatic dependent launch: CUDA
    compute capability 9.0 or newer, not under the Triton interpreter, and :data:`PDL` on."""
    if not PDL or t.device.type != "cuda" or triton_interpreted():
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_DEVICES:
        _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_DEVICES[idx]


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords for a Triton kernel: ``launch_pdl`` when ``pdl``."""
    return {"launch_pdl": True} if pdl else {}
