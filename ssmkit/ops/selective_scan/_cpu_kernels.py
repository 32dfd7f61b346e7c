"""Optional Numba kernel for the chunked CPU scan's recurrence (used when ``numba`` is installed).

The pure-PyTorch chunked form spends most of its time in the sequential part: one ``addcmul_``
per time step over a ``(batch, dim, N)`` slice (a single thread, Python overhead per step), plus
the passes that build B̄x and reduce C·h. This kernel fuses those three into one loop that keeps
each channel's N states in registers and runs the channels in parallel:

    for each (b, d) in parallel:            h = state[b, d, :]
        for t in chunk:  h = Ā[b, d, t, :] * h + (Δx)[b, t, d] * B[b, t, g, :]
                         y[b, t, d] = Σ_n C[b, t, g, n] h[n]

Ā = exp(ΔA) is still computed by PyTorch (vectorised ``exp``; Numba's scalar ``exp`` is not)
into a ``(batch, dim, T, N)`` buffer, so each channel's block is contiguous. Disable with the
environment variable ``SSMKIT_NO_NUMBA=1``.
"""

from __future__ import annotations

import importlib.util
import os

_KERNEL = None
_TRIED = False


def numba_available() -> bool:
    return os.environ.get("SSMKIT_NO_NUMBA", "0") != "1" and importlib.util.find_spec("numba") is not None


def get_kernel():
    """The compiled kernel, or None when Numba is absent/disabled (or fails to load)."""
    global _KERNEL, _TRIED
    if not numba_available():
        return None
    if _TRIED:
        return _KERNEL
    _TRIED = True
    try:
        _KERNEL = _build()
    except Exception:  # pragma: no cover - a broken Numba install must not break the scan
        _KERNEL = None
    return _KERNEL


def _build():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def scan_recurrence(dA, dtx, B, C, h, y, Dg):  # pragma: no cover - compiled
        # dA: (b, D, T, N)  dtx: (b, T, D)  B, C: (b, T, G, N)  h: (b, D, N) in/out  y: (b, T, D) out
        bsz, D, T, N = dA.shape
        for bd in prange(bsz * D):
            b = bd // D
            d = bd - b * D
            g = d // Dg
            hd = h[b, d]
            for t in range(T):
                xt = dtx[b, t, d]
                acc = 0.0
                for n in range(N):
                    v = dA[b, d, t, n] * hd[n] + xt * B[b, t, g, n]
                    hd[n] = v
                    acc += C[b, t, g, n] * v
                y[b, t, d] = acc

    return scan_recurrence
