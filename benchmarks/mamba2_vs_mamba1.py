"""Mamba-2 against Mamba-1, layer against layer, on one device: forward + backward time of
ssmkit's ``Mamba2`` (SSD, N 64 and 128) and ``Mamba`` (selective scan, N 16) mixers of the same
d_model against the sequence length. The Mamba-2 paper's claim is that SSD makes the layer 2-8x
faster to train than Mamba-1's; this program states the ratio the device gives and plots it.

Defaults: d_model 2048 (expand 2, headdim 64 for Mamba-2), batch 4, seqlen 2048-16384, float32
weights under bf16 autocast (as in training; float32 on the CPU), one layer's forward +
backward of ``out.float().square().mean()``, medians of ``--reps`` timed runs after warm-up. On
CUDA both layers run their Triton kernels (``backend="triton"`` forced: the SSD's Triton form is
opt-in), ``--chunked`` adds the Mamba-2 layer with its chunked PyTorch SSD. Writes JSON and a PNG
(``--out-dir``)::

    python benchmarks/mamba2_vs_mamba1.py --out-dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from _results import cpu_name, result_path, write_json  # noqa: E402

from ssmkit.layers import Mamba, Mamba2  # noqa: E402
from ssmkit.ops import dispatch  # noqa: E402


def _layers(d_model: int, chunked: bool) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """``name -> (layer, forced backend)``."""
    out = {"Mamba-1 (N 16)": (Mamba(d_model, d_state=16), "triton")}
    for n in (64, 128):
        out[f"Mamba-2 (N {n})"] = (Mamba2(d_model, d_state=n, headdim=64), "triton")
    if chunked:
        out["Mamba-2 (N 128), chunked SSD"] = (Mamba2(d_model, d_state=128, headdim=64), "chunked")
    return out


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def time_layer(layer, x: torch.Tensor, backend: str | None, reps: int, warmup: int) -> float:
    """Median ms of one forward + backward."""
    device = x.device
    cast = device.type == "cuda"

    def step():
        with dispatch.force_backend(backend if device.type == "cuda" else None), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cast):
            y = layer(x)
        y.float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    timed = _timer(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(timed(step) for _ in range(reps))


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    L = res["seqlens"]
    for name, ms in res["ms"].items():
        ax1.plot(L, ms, "o-", label=name)
        if name != "Mamba-1 (N 16)":
            ax2.plot(L, [m1 / m2 for m1, m2 in zip(res["ms"]["Mamba-1 (N 16)"], ms)], "o-", label=name)
    ax1.set_yscale("log")
    ax1.set_ylabel("layer forward + backward, ms")
    ax2.set_ylabel("Mamba-1 time / Mamba-2 time")
    ax2.axhline(1.0, color="gray", lw=0.8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seqlen")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    info = res["info"]
    fig.suptitle(f"d_model {info['d_model']}, batch {info['batch']} — {info['device']}, {info['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlens", default="2048,4096,8192,16384")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunked", action="store_true", help="also the Mamba-2 layer with the chunked SSD")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default="results")
    a = p.parse_args(argv)
    try:
        seqlens = [int(s) for s in a.seqlens.split(",")]
    except ValueError:
        p.error(f"--seqlens: comma-separated integers expected, got {a.seqlens!r}")
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info = {"device": name, "torch": str(torch.__version__), "d_model": a.d_model, "batch": a.batch,
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/mamba2_vs_mamba1.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(info, flush=True)
    torch.manual_seed(0)
    layers = {k: (m.to(device), b) for k, (m, b) in _layers(a.d_model, a.chunked).items()}
    res = {"info": info, "seqlens": seqlens, "ms": {k: [] for k in layers}}
    for L in seqlens:
        x = torch.randn(a.batch, L, a.d_model, device=device, requires_grad=True)
        row = []
        for k, (layer, backend) in layers.items():
            try:
                ms = time_layer(layer, x, backend, a.reps, a.warmup)
            except torch.cuda.OutOfMemoryError:
                ms = float("nan")
                torch.cuda.empty_cache()
            res["ms"][k].append(ms)
            row.append(f"{k} {ms:.2f} ms")
        m1 = res["ms"]["Mamba-1 (N 16)"][-1]
        ratios = {k: m1 / v[-1] for k, v in res["ms"].items() if k != "Mamba-1 (N 16)"}
        print(f"L {L}: " + ", ".join(row) + " | Mamba-1 / Mamba-2: "
              + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()), flush=True)
    res["ratio_mamba1_over_mamba2"] = {k: [m1 / m2 for m1, m2 in zip(res["ms"]["Mamba-1 (N 16)"], v)]
                                       for k, v in res["ms"].items() if k != "Mamba-1 (N 16)"}
    path = result_path(a.out_dir, "mamba2_vs_mamba1", device.type)
    write_json(path, res)
    print("wrote", path)
    try:
        plot(res, os.path.splitext(path)[0] + ".png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
