"""Freed CPU memory kept in the process for the next allocation (glibc's ``malloc``).

A forward over a long prompt allocates and frees hundreds of tensors of a few MB. glibc serves an
allocation above its mmap threshold (128 KiB at start, raised by later frees up to 32 MiB) with
a fresh mapping, and gives freed memory at the top of its heap back to the system beyond its trim
threshold, so the same buffers are mapped and zero-filled again, a page fault every 4 KiB, on
every call: 165,000-175,000 page faults (about 680 MB of fresh pages) in one 1024-token prefill
of the 130M Mamba-2, 145,000-410,000 in Gated DeltaNet's.

:func:`keep_freed_memory` sets both thresholds once per process with ``mallopt`` (mmap 32 MiB,
the most glibc allows; trim 256 MiB): those faults drop to a few hundred, the peak memory is
unchanged, and up to 256 MiB of freed memory stays with the process between calls.
``LanguageModel`` calls it on its first CPU forward; ``SSMKIT_CPU_KEEP_MEMORY=0`` leaves
``malloc`` as it is. Other C libraries than glibc are left alone. Measured on a 2-core AMD
EPYC, 2026-12-08, each setting in processes of its own, alternating (``python benchmarks/cpu_memory.py``,
``docs/benchmarks/cpu_memory.json``): the eager prefill 1.03-1.08x faster for Mamba, 1.11-1.14x
for Mamba-2 and 1.08-1.25x for Gated DeltaNet (one and two threads).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory"]

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_done: bool | None = None  # None: not tried yet; then whether the thresholds were set


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring), once per process; returns
    whether they are set (False: not glibc, ``SSMKIT_CPU_KEEP_MEMORY=0``, or ``mallopt`` refused)."""
    global _done
    if _done is None:
        _done = False
        if os.environ.get("SSMKIT_CPU_KEEP_MEMORY", "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                _done = False
    return _done
