"""Reproduce the Mamba paper's synthetic-task results on this machine (minutes on a laptop CPU).

Trains a small 2-layer model per row (S4D without gating, S6 without gating, Mamba, Mamba-2,
attention with RoPE) on selective copying (Mamba paper Table 1) and induction heads (Table 2,
evaluated at 1x to 256x the training length), prints the table beside the paper's numbers and
writes reproduce.json, reproduce.md and reproduce.png. Seeds and thread counts are fixed, so a
rerun prints the same table. ``--full`` uses the paper's sizes (for a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time

NAME = "reproduce"
HELP = "re-run the Mamba paper's selective-copying and induction-heads experiments"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ssmkit.training.reproduce import EXPERIMENTS, ROWS

    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help=f"which experiments (default: all of {', '.join(EXPERIMENTS)})")
    p.add_argument("--rows", nargs="+", metavar="ROW", help=f"which models (default: all of {', '.join(ROWS)})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's sizes (needs a GPU; hours)")
    size.add_argument("--quick", action="store_true", help="a seconds-long smoke test (numbers mean nothing)")
    p.add_argument("--out", default="reproduce_out", help="output directory (default ./reproduce_out)")
    p.add_argument("--jobs", type=int, default=None, help="parallel worker processes (default: CPU cores)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default 1; fixed for rerun equality)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps of every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --full when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.training import reproduce as rp

    experiments = args.experiments or list(rp.EXPERIMENTS)
    for e in experiments:
        if e not in rp.EXPERIMENTS:
            raise ValueError(f"unknown experiment {e!r}: choose from {', '.join(rp.EXPERIMENTS)}")
    rows = args.rows or list(rp.ROWS)
    for r in rows:
        if r not in rp.ROWS:
            raise ValueError(f"unknown row {r!r}: choose from {', '.join(rp.ROWS)}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    size = "full" if args.full else "quick" if args.quick else "default"
    device = args.device or ("cuda" if size == "full" and torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    jobs = args.jobs if args.jobs is not None else (1 if size == "quick" else None)
    print(f"ssmkit reproduce ({size} size): {', '.join(experiments)}; rows {', '.join(rows)}; device {device}; "
          f"{jobs or 'auto'} job(s) x {args.threads} thread(s); results in {args.out}/", flush=True)
    t0 = time.perf_counter()
    report = rp.reproduce(experiments, rows, size=size, jobs=jobs, threads=args.threads, seed=args.seed,
                          device=device, steps=args.steps, progress=True)
    paths = rp.write_outputs(report, args.out)
    print()
    print(report["tables"])
    print("Claims (the papers' findings; reported, never tuned):")
    print(rp.format_claims(report["claims"]))
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; wrote " + ", ".join(str(p) for p in paths.values()))
    sys.stdout.flush()
    return 0
