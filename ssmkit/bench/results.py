"""Writing a benchmark's results: whole or not at all, named by the card (or CPU) and the date.

A JSON file is written to a temporary file in the same directory and renamed over the target
(``os.replace`` is atomic on POSIX), so a run stopped half-way (a time limit, say)
never leaves a truncated file in place of an earlier one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(device: str = "cuda") -> str:
    """A short lower-case name of the machine: ``h100``, ``h200``, ``a100`` ... or ``cpu``."""
    if device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name()
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return (m.group(1) if m else re.sub(r"[^0-9a-zA-Z]+", "-", name)).lower()


def result_path(out_dir: str | os.PathLike, name: str, device: str = "cuda") -> str:
    """``OUT_DIR/NAME_<card>_<date>.json`` (the date in UTC); the folder is created."""
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(os.fspath(out_dir), f"{name}_{machine_slug(device)}_{date}.json")
