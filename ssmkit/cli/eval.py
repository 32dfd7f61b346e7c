"""Evaluate a training checkpoint on its task (or another one), at the training length or longer.

Examples:
  ssmkit eval runs/ih --lengths 32 128 512 2048
  ssmkit eval runs/sc/checkpoint-00000500.pt --task selective-copying --task-arg length=128
  ssmkit eval runs/bytes --lm-eval lambada_openai,hellaswag --limit 200
  ssmkit eval state-spaces/mamba-130m-hf --lm-eval my_task --include my_tasks/ --output results.json

CHECKPOINT is a run directory written by ssmkit train (its newest checkpoint) or one
checkpoint-<step>.pt file. With --lm-eval TASKS it is a model: a checkpoint directory, a run
directory, a Hugging Face repo id or a preset name, evaluated on lm-evaluation-harness tasks
(pip install 'ssmkit[lm_eval]').
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssmkit.cli import args as A

NAME = "eval"
HELP = "evaluate a training checkpoint on a task, or a model on lm-evaluation-harness tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint-<step>.pt file; "
                   "with --lm-eval, a model (checkpoint directory, run directory, repo id or preset)")
    p.add_argument("--task", help="task name (default: the one the checkpoint was trained on)")
    p.add_argument("--task-arg", type=A.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a task setting, e.g. length=128 (repeatable)")
    p.add_argument("--lengths", type=A.int_range(2), nargs="+", help="evaluate at these sequence lengths "
                   "(default: the training length)")
    p.add_argument("--sequences", type=A.positive_int, default=256, help="sequences per length")
    p.add_argument("--batch-size", type=A.positive_int, default=32, help="sequences per forward pass")
    p.add_argument("--seed", type=A.nonneg_int, default=1234, help="seed of the evaluation batches")
    p.add_argument("--device", type=A.device(), default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    h = p.add_argument_group("lm-evaluation-harness (on a model directory)")
    h.add_argument("--lm-eval", type=A.comma_list(name="task"), metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks or groups")
    h.add_argument("--include", metavar="DIR", help="a directory of task YAML files to add to the harness's")
    h.add_argument("--limit", type=A.positive_int, help="documents per task at most (default: all)")
    h.add_argument("--num-fewshot", type=A.nonneg_int, help="few-shot examples per prompt (default: the task's)")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (auto: the checkpoint's)")
    h.add_argument("--output", metavar="FILE", help="write the harness's results as JSON here")


def _load(path: Path) -> dict:
    from ssmkit.training import checkpoint as ckpt

    if path.is_dir():
        state = ckpt.load_latest(path)
        if state is None:
            raise A.CLIError(f"{path}: no checkpoint-*.pt in this directory (is it a run directory of ssmkit train?)")
        return state
    if not path.exists():
        raise A.CLIError(f"{path} does not exist")
    return ckpt.load_checkpoint(path)


def run(args: argparse.Namespace) -> int:
    if args.lm_eval is not None:
        return run_lm_eval(args)
    for flag in ("include", "limit", "num_fewshot", "output"):
        if getattr(args, flag) is not None:
            raise A.CLIError(f"--{flag.replace('_', '-')} goes with --lm-eval TASKS")
    return run_task(args)


def run_lm_eval(args: argparse.Namespace) -> int:
    """The model on lm-evaluation-harness tasks; prints the harness's table."""
    import json

    for flag, given in (("--task", args.task), ("--task-arg", args.task_arg), ("--lengths", args.lengths)):
        if given:
            raise A.CLIError(f"{flag} is for synthetic tasks; with --lm-eval give the harness's task names")
    if args.include is not None and not Path(args.include).is_dir():
        raise A.CLIError(f"--include {args.include}: not a directory")
    out = A.check_output_file("--output", args.output) if args.output else None
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise A.CLIError("--lm-eval needs the lm_eval package: pip install 'ssmkit[lm_eval]'") from None
    from ssmkit.cli.generate import _load
    from ssmkit.inference.harness import harness_model

    device = "cpu" if args.device == "auto" and not _cuda() else ("cuda" if args.device == "auto" else args.device)
    # The harness's own task index takes seconds to build: skip it when --include has every task.
    manager = TaskManager(include_path=args.include, include_defaults=False) if args.include else None
    if manager is None or not set(args.lm_eval) <= set(manager.all_tasks):
        manager = TaskManager(include_path=args.include)
    unknown = [t for t in args.lm_eval if t not in set(manager.all_tasks)]
    if unknown:
        raise A.CLIError(f"--lm-eval: unknown task(s) {', '.join(map(repr, unknown))}"
                         + ("" if args.include else " (give --include DIR for your own task files)"))
    model, ckpt_dir = _load(args.checkpoint, device, args.dtype)
    lm = harness_model(model, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.lm_eval, task_manager=manager, limit=args.limit,
                                      num_fewshot=args.num_fewshot, random_seed=args.seed, log_samples=False)
    print(results_table(results["results"]))
    if out is not None:
        out.write_text(json.dumps({"model": args.checkpoint, "results": results["results"],
                                   "versions": results.get("versions", {})}, indent=2, default=str) + "\n")
    return 0


def results_table(results: dict) -> str:
    """One line per task and metric: ``task  metric  filter  value  ± stderr``."""
    rows = [("task", "metric", "filter", "value", "stderr")]
    for task, res in results.items():
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            err = res.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, filt, _number(value), _number(err) if err is not None else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def _number(v) -> str:
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return str(v)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_task(args: argparse.Namespace) -> int:
    import math
    import sys

    import torch
    from tqdm.auto import tqdm

    from ssmkit.cli.train import check_task_args
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel
    from ssmkit.tasks import get_task
    from ssmkit.training.trainer import TrainConfig, Trainer

    path = Path(args.checkpoint)
    state = _load(path)
    if not state.get("model_config"):
        raise A.CLIError(f"{path} has no model_config (was it written by ssmkit train?)")
    saved_task = state.get("task") or {}
    name = args.task or saved_task.get("name")
    if not name or name == "bytes":
        raise A.CLIError("give --task NAME (the checkpoint's own task is not a synthetic task)")
    kwargs = {k: v for k, v in saved_task.items() if k != "name"} if name == saved_task.get("name") else {}
    kwargs.update(check_task_args(name, args.task_arg))
    task = get_task(name, **kwargs)
    lengths = args.lengths or [task.seqlen]
    tasks = [task.with_seqlen(L) if L != task.seqlen else task for L in lengths]  # checks each length first
    model = LanguageModel(ModelConfig.from_dict(state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise A.CLIError(f"{path}: the weights do not match the checkpoint's model_config ({A.one_line(e)})") from None
    cfg = TrainConfig(steps=1, batch_size=args.batch_size, progress=False, device=args.device, eval_seed=args.seed)
    trainer = Trainer(model, task, cfg)
    bs = min(args.batch_size, args.sequences)
    n_batches = math.ceil(args.sequences / bs)
    print(f"checkpoint step {state['step']}; task {task.describe()}")
    rows = []
    bar = tqdm(total=len(lengths) * n_batches, unit="batch", file=sys.stderr, disable=args.quiet or None,
               desc="eval", leave=False)
    with torch.no_grad():
        for L, t in zip(lengths, tasks):
            rows.append((L, trainer.evaluate(t, n_batches=n_batches, batch_size=bs, on_batch=bar.update)))
    bar.close()
    print(f"{'length':>8} {'acc':>8} {'seq_acc':>8} {'loss':>8}")
    for L, res in rows:
        print(f"{L:>8} {res['acc']:>8.2%} {res['seq_acc']:>8.2%} {res['loss']:>8.4f}")
    return 0
