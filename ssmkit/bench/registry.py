"""Benchmark registry: ops x backends x shapes, timed the same way on every machine.

Each :class:`Case` builds inputs for one shape and returns a closure per backend. ``run`` times
forward and (optionally) forward+backward for every backend the op has, on CUDA with
``triton.testing.do_bench`` (median, events) and on CPU with ``torch.utils.benchmark``
(``blocked_autorange`` median), records peak CUDA memory, and returns rows ready for JSON.
``plot`` draws time vs seqlen per op and backend (log-log: slope 1 for SSM scans, 2 for
attention).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable

import torch

from ssmkit.bench.results import cpu_name


@dataclasses.dataclass
class Case:
    op: str
    make: Callable[..., tuple]  # (shape dict, device, dtype, requires_grad) -> args tuple
    call: Callable[..., object]  # (backend, *args) -> output tensor (or tuple; first is used)
    backends: Callable[[torch.device], list[str]]
    shapes: Callable[[torch.device], list[dict]]
    fwd_bwd: bool = True


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    REGISTRY[case.op] = case
    return case


def _median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()  # warm-up
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3)
    return m.median * 1e3


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "host": platform.node(),
            "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(ops: list[str] | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32, backends: list[str] | None = None,
        fwd_bwd: bool = True, seqlens: list[int] | None = None, log=print) -> list[dict]:
    """Time every (op, backend, shape); returns one dict per measurement."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    rows = []
    work = []
    for name in ops or list(REGISTRY):
        case = REGISTRY[name]
        shapes = case.shapes(device)
        if seqlens:
            shapes = [dict(s, L=L) for L in seqlens for s in shapes[:1]]
        work += [(name, case, shape, be) for shape in shapes for be in case.backends(device)
                 if not backends or be in backends]
    # (a bar on stderr where it is a terminal; the rows go to ``log`` as they are measured)
    for name, case, shape, be in tqdm(work, unit="case", desc="bench", file=sys.stderr, disable=None):
        row = {"op": name, "backend": be, **shape, "dtype": str(dtype).replace("torch.", "")}
        try:
            args = case.make(shape, device, dtype, False)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row["fwd_ms"] = _median_ms(lambda c=case, b=be, a=args: c.call(b, *a), device)
            if device.type == "cuda":
                row["fwd_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            if fwd_bwd and case.fwd_bwd:
                gargs = case.make(shape, device, dtype, True)

                def step(case=case, be=be, gargs=gargs):
                    out = case.call(be, *gargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out.float().sum().backward()
                    for t in gargs:
                        if isinstance(t, torch.Tensor):
                            t.grad = None

                row["fwd_bwd_ms"] = _median_ms(step, device)
        except Exception as e:  # noqa: BLE001 - one failing form must not stop the table
            row["error"] = f"{type(e).__name__}: {e}"
        log(json.dumps(row))
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Time vs seqlen per (op, backend), log-log. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list] = {}
    for r in rows:
        if "fwd_ms" in r and "L" in r:
            series.setdefault((r["op"], r["backend"]), []).append((r["L"], r["fwd_ms"]))
    for (op, be), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{op} [{be}]")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("seqlen")
    ax.set_ylabel("forward ms (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
