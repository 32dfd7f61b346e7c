"""Cache sizes of the CPU, for choosing the chunk lengths of the CPU forms.

Read once from Linux's ``/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}``; where
that is missing (other systems, containers hiding it) the fallbacks below are used.
"""

from __future__ import annotations

import functools
import os

FALLBACK_BYTES = {1: 32 << 10, 2: 1 << 20, 3: 8 << 20}
_SYS = "/sys/devices/system/cpu/cpu0/cache"


def _parse_size(text: str) -> int:
    """``"1024K"`` / ``"32M"`` / ``"49152"`` -> bytes."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.cache
def cache_sizes() -> dict[int, int]:
    """``{level: bytes}`` of cpu0's data (or unified) caches, e.g. ``{1: 49152, 2: 1048576, 3: 33554432}``."""
    out: dict[int, int] = {}
    try:
        for entry in sorted(os.listdir(_SYS)):
            if not entry.startswith("index"):
                continue
            path = os.path.join(_SYS, entry)
            with open(os.path.join(path, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "size")) as f:
                out[level] = _parse_size(f.read())
    except (OSError, ValueError):
        return dict(FALLBACK_BYTES)
    return out or dict(FALLBACK_BYTES)


def last_level_cache_bytes() -> int:
    """Size of the largest (last-level) cache, shared by the cores."""
    sizes = cache_sizes()
    return sizes[max(sizes)]
