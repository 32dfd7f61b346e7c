"""Writing a benchmark's results: whole or not at all.

A JSON file is written to a temporary file in the same directory and renamed over the target
(``os.replace`` is atomic on POSIX), so a run stopped half-way (a device call's time limit, say)
never leaves a truncated file in place of an earlier one.
"""

from __future__ import annotations

import json
import os
import tempfile


def write_json(path: str | os.PathLike, obj: object, indent: int = 1) -> None:
    """``json.dump(obj)`` to ``path`` through a temporary file and a rename."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # (mkstemp makes 0600 files)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
