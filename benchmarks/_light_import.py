"""Import ssmkit's op modules even when the package ``__init__`` cannot be imported.

The GPU programs need only a few op modules. ``light()`` first tries the real ``import ssmkit``
(from an install, or from the checkout this folder belongs to); if that fails, for example
because an optional dependency of an unrelated module is missing, it registers bare package
objects for ``ssmkit`` and ``ssmkit.ops`` (and the other listed packages), so that
``import ssmkit.ops.selective_scan.triton`` loads just that module and what it imports. Call it
before importing anything from ssmkit.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def light(packages=("ssmkit", "ssmkit.bench", "ssmkit.ops", "ssmkit.ops.selective_scan", "ssmkit.ops.conv",
                    "ssmkit.inference", "ssmkit.layers", "ssmkit.models")) -> bool:
    """Try the real ``import ssmkit``; on failure fall back to bare packages. Returns True if real."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        importlib.import_module("ssmkit")
        return True
    except Exception as e:  # noqa: BLE001 - any error in someone else's module
        print(f"[light import] ssmkit did not import ({type(e).__name__}: {e}); using bare packages")
    for name in list(sys.modules):
        if name == "ssmkit" or name.startswith("ssmkit."):
            del sys.modules[name]
    for pkg in packages:
        mod = types.ModuleType(pkg)
        mod.__path__ = [os.path.join(ROOT, *pkg.split("."))]
        sys.modules[pkg] = mod
        parent, _, child = pkg.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    return False
