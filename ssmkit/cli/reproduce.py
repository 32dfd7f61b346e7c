"""Reproduce the Mamba paper's synthetic-task results on this machine (minutes on a laptop CPU).

Trains a small 2-layer model per row (S4D without gating, S6 without gating, Mamba, Mamba-2,
attention with RoPE) on selective copying (Mamba paper Table 1) and induction heads (Table 2,
evaluated at 1x to 256x the training length), prints the table beside the paper's numbers and
writes reproduce.json, reproduce.md and reproduce.png into --out (default ./reproduce_out/).
Seeds and thread counts are fixed, so a rerun on the same machine prints the same table (another
CPU may round differently and differ in a few cells).

Two more runs, each with its own files in --out:
  --table1   Table 1 as the paper's grid: selective copying with block {no gate, H3, Mamba} x inner
             layer {S4D, Hyena, S6} (table1.*; about 9 minutes on 2 cores)
  --lra      Long Range Arena's Pathfinder: S4D vs attention on 32x32 images (lra.*; about 15
             minutes on 2 cores); with --full, Path-X (128x128, 16,385 tokens) for a GPU

Each row trains in its own run directory (--out/<run>_rows/<experiment>__<row>: checkpoints,
metrics, result.json). Stop a run with Ctrl-C or SIGTERM (a time limit): the row in progress
writes a checkpoint first; the same command with --resume reads the finished rows back and
continues the stopped one, so a --full run can be split over several commands.

Sizes:
  (default)  CPU scale: about 9 minutes on 2 cores
  --quick    a seconds-long smoke test of the pipeline: its numbers mean nothing, no verdicts
  --full     the paper's sizes: for a GPU (hours; days on a CPU)

Examples:
  ssmkit reproduce
  ssmkit reproduce induction-heads --rows mamba attention --out results/ih
  ssmkit reproduce --table1
  ssmkit reproduce --lra
  timeout 590 ssmkit reproduce --full --device cuda --out full; ssmkit reproduce --full --device cuda --out full --resume
"""

from __future__ import annotations

import argparse
import sys

from ssmkit.cli import args as A

NAME = "reproduce"
HELP = "re-run the Mamba paper's selective-copying and induction-heads experiments"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ssmkit.training.reproduce import DEFAULT_EXPERIMENTS, DEFAULT_ROWS, ROWS

    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help=f"which experiments (default: {', '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help=f"which models (default: {', '.join(DEFAULT_ROWS)}; also {', '.join(sorted(set(ROWS) - set(DEFAULT_ROWS)))})")
    p.add_argument("--table1", action="store_true",
                   help="the Mamba paper's Table 1 grid: selective copying, block {no gate, H3, Mamba} x inner "
                        "layer {S4D, Hyena, S6} (writes table1.*)")
    p.add_argument("--lra", action="store_true",
                   help="Long Range Arena's Pathfinder: S4D vs attention at 32x32, Path-X (128x128) with --full "
                        "(writes lra.*)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's sizes (for a GPU; hours)")
    size.add_argument("--quick", action="store_true", help="a seconds-long smoke test (numbers mean nothing)")
    p.add_argument("--out", default="reproduce_out", metavar="DIR",
                   help="output directory for reproduce.json, .md and .png")
    p.add_argument("--force", action="store_true", help="overwrite the results of an earlier run in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue a run stopped in --out: finished rows are read back, the interrupted one "
                        "continues from its last checkpoint (split a long --full run over several commands)")
    p.add_argument("--jobs", type=A.positive_int, default=None,
                   help="parallel worker processes (default: CPU cores / --threads; 1 for --quick)")
    p.add_argument("--threads", type=A.positive_int, default=1, help="threads per worker (fixed for rerun equality)")
    p.add_argument("--steps", type=A.positive_int, default=None, help="override the training steps of every row")
    p.add_argument("--seed", type=A.nonneg_int, default=0, help="seed of every row")
    p.add_argument("--device", type=A.device(allow_auto=False), default=None,
                   help="cpu or cuda (default: cuda for --full when available, else cpu)")


def _split(args: argparse.Namespace, experiments: tuple, rows: dict, default_rows: tuple,
           default_experiments: tuple | None = None) -> tuple[list[str], list[str]]:
    """Experiments and rows; experiment names typed after --rows (which takes several) count as experiments."""
    exps = list(args.experiments)
    rws = []
    for r in args.rows or []:
        (exps if r in experiments else rws).append(r)
    for e in exps:
        if e not in experiments:
            hint = " (a row: give it after --rows)" if e in rows else ""
            raise A.CLIError(f"unknown experiment {e!r}{hint}: choose from {', '.join(experiments)}")
    for r in rws:
        if r not in rows:
            raise A.CLIError(f"--rows: unknown row {r!r}: choose from {', '.join(rows)}")
    if args.rows and not rws:
        raise A.CLIError(f"--rows: no row given (choose from {', '.join(rows)})")
    return exps or list(default_experiments or experiments), rws or list(default_rows)


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.training import reproduce as rp

    if args.table1 and args.lra:
        raise A.CLIError("--table1 and --lra are separate runs: give one of them")
    if args.table1:
        name, (experiments, rows) = "table1", _split(args, ("selective-copying",), rp.ROWS, rp.TABLE1_ROWS)
    elif args.lra:
        name, (experiments, rows) = "lra", _split(args, ("pathfinder",), rp.ROWS, rp.LRA_ROWS)
    else:
        name, (experiments, rows) = "reproduce", _split(args, rp.EXPERIMENTS, rp.ROWS, rp.DEFAULT_ROWS,
                                                        rp.DEFAULT_EXPERIMENTS)
    size = "full" if args.full else "quick" if args.quick else "default"
    device = args.device or ("cuda" if size == "full" and torch.cuda.is_available() else "cpu")
    out = A.check_output_dir("--out", args.out)
    rows_dir = out / f"{name}_rows"  # one run directory (checkpoints, metrics, result) per row
    earlier = [p.name for p in (out / f"{name}.json", out / f"{name}.md", out / f"{name}.png", rows_dir)
               if p.exists()]
    if args.resume and args.force:
        raise A.CLIError("--resume and --force contradict each other: --resume keeps the earlier rows, "
                         "--force replaces them")
    if earlier and not (args.force or args.resume):
        raise A.CLIError(f"--out {out} already holds results ({', '.join(earlier)}); pass --resume to continue "
                         "that run, --force to overwrite it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.force and rows_dir.exists():
        import shutil

        shutil.rmtree(rows_dir)
    jobs = args.jobs if args.jobs is not None else (1 if size == "quick" else None)
    print(f"ssmkit reproduce ({size} size): {', '.join(experiments)}; rows {', '.join(rows)}; device {device}; "
          f"{jobs or 'auto'} job(s) x {args.threads} thread(s); results in {out}/", flush=True)
    if size == "quick":
        print("--quick is a smoke test of the pipeline: its numbers mean nothing and get no verdict.", flush=True)
    if size == "full" and device == "cpu":
        print("--full on the CPU: the paper's sizes (up to 400,000 steps per row) take days here; "
              "use a GPU (--device cuda) or drop --full.", file=sys.stderr, flush=True)
    from ssmkit.cli.main import Interrupted
    from ssmkit.training.trainer import TrainingInterrupted

    try:
        report = rp.reproduce(experiments, rows, size=size, jobs=jobs, threads=args.threads, seed=args.seed,
                              device=device, steps=args.steps, progress=True, rows_dir=rows_dir,
                              resume=args.resume)
    except TrainingInterrupted as e:
        raise Interrupted(f"{e}; continue with the same command and --resume", 128 + int(e.signum)) from None
    paths = rp.write_outputs(report, out, name)
    print()
    print(report["tables"])
    print("Claims (reported as measured, never tuned):")
    print(rp.format_claims(report["claims"], size))
    print(f"\nwall time {report['wall_seconds']:.0f}s; wrote " + ", ".join(str(p) for p in paths.values()))
    sys.stdout.flush()
    return 0
