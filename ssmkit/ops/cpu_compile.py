"""Compiled CPU kernels: ``torch.compile`` (Inductor's C++ backend) for the inner loops of the CPU
forms, used when asked for and a C++ compiler is found; otherwise the eager forms run.

Inductor turns a chunk of a scan, written as a short unrolled Python loop of elementwise ops, into
one C++ loop nest that keeps the state in registers across the chunk's steps (no per-step passes
over memory, no per-step Python call). That needs a C++ compiler at run time and compiles for
several seconds per new shape (seconds more per thread count), so it is off by default:

* ``SSMKIT_CPU_COMPILE=1`` in the environment, or :func:`set_cpu_compile` ``(True)``, turns it on;
* without a C++ compiler (``$CXX`` or ``g++``), or if compiling fails, the eager form runs (the
  failure is reported once as a warning).

Compiled kernels are cached per shape and torch thread count (Inductor specialises its OpenMP
loops on the thread count); Inductor's own on-disk cache makes later processes start faster.

Kernels are traced once per input shape (``make_fx``) and compiled by Inductor without Dynamo
(:func:`compiled_graph`): no guards run on a call (2-3 us of overhead, against ~15-30 us for a
``torch.compile`` function's guards and wrappers), which matters for the GEMVs of decoding
(:mod:`ssmkit.ops.cpu_gemv`, a few microseconds each) and the scan's many chunk calls alike. The
generated C++ contracts ``a * b + c`` into fused multiply-adds (Inductor's
``cpp.enable_floating_point_contract_flag = "fast"``; off by default in Inductor): one rounding
instead of two, and 11% faster in the selective scan's chunk kernel on an AVX-512 CPU.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable

import torch

__all__ = ["compiler_available", "cpu_compile_enabled", "compiled_graph", "set_cpu_compile"]

_forced: bool | None = None
_failed: set[str] = set()
_graphs: dict[tuple, Callable] = {}
# Inductor options of every compiled kernel (module docstring).
_INDUCTOR_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def set_cpu_compile(enabled: bool | None) -> None:
    """Turn compiled CPU kernels on (True) or off (False); None: follow ``SSMKIT_CPU_COMPILE``."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _forced = enabled


@functools.cache
def compiler_available() -> bool:
    """Whether Inductor finds a C++ compiler (``$CXX``, else ``g++``)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except Exception:  # noqa: BLE001 - no compiler, or Inductor's lookup changed
        return shutil.which(os.environ.get("CXX", "g++")) is not None


def cpu_compile_enabled(t: torch.Tensor) -> bool:
    """Whether a compiled kernel should run for CPU tensor ``t`` now: asked for, a compiler found,
    and not inside a ``torch.compile`` trace of the caller (which compiles the eager form itself)."""
    on = _forced if _forced is not None else os.environ.get("SSMKIT_CPU_COMPILE", "0") == "1"
    return (on and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and compiler_available())


def _report_failure(name: str, e: Exception) -> None:
    _failed.add(name)
    warnings.warn(f"ssmkit: compiling the CPU kernel {name!r} failed, using the eager form "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                  RuntimeWarning, stacklevel=4)


def compiled_graph(name: str, fn: Callable, key: tuple, args: list[torch.Tensor]) -> Callable | None:
    """``fn`` traced at ``args`` (``make_fx``: a graph of aten ops) and compiled by Inductor, for one
    ``key`` at the current thread count; or None once compiling ``name`` has failed.

    No guards run on a call: ``key`` must fix every input's shape, dtype and strides (the compiled
    code asserts sizes and strides), and ``fn`` must be a pure function of its tensor arguments
    returning a tuple of tensors; it may update its arguments in place. The returned callable takes the tensors positionally and returns
    that tuple, or None if running it failed (reported once).
    """
    if name in _failed:
        return None
    k = (name, key, torch.get_num_threads())
    kern = _graphs.get(k)
    if kern is None:
        try:
            from torch._inductor.compile_fx import compile_fx
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad():
                # traced on fake tensors: tracing must not run fn's in-place updates on args
                compiled = compile_fx(make_fx(fn, tracing_mode="fake")(*args), list(args),
                                  config_patches=_INDUCTOR_OPTIONS)
        except Exception as e:  # noqa: BLE001 - a compiler or Inductor failure of any kind
            _report_failure(name, e)
            return None

        def kern(*a, _compiled=compiled):
            try:
                return _compiled(*a)
            except Exception as e:  # noqa: BLE001
                _report_failure(name, e)
                return None

        _graphs[k] = kern
    return kern
