"""Evaluate a training checkpoint on its task (or another one), at the training length or longer.

Example::

    ssmkit eval runs/ih --lengths 32 128 512 2048
    ssmkit eval runs/sc/checkpoint-00000500.pt --task selective-copying --task-arg length=128
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "eval"
HELP = "evaluate a training checkpoint on a task"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ssmkit.cli.train import _kv

    p.add_argument("checkpoint", help="a checkpoint file or a run directory (its newest checkpoint)")
    p.add_argument("--task", help="task name (default: the one the checkpoint was trained on)")
    p.add_argument("--task-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lengths", type=int, nargs="+", help="evaluate at these sequence lengths")
    p.add_argument("--sequences", type=int, default=256, help="sequences per length (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import math

    import torch

    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel
    from ssmkit.tasks import get_task
    from ssmkit.training import checkpoint as ckpt
    from ssmkit.training.trainer import TrainConfig, Trainer

    path = Path(args.checkpoint)
    if path.is_dir():
        state = ckpt.load_latest(path)
        if state is None:
            raise FileNotFoundError(f"no checkpoint found in {path}")
    else:
        state = ckpt.load_checkpoint(path)
    if not state.get("model_config"):
        raise ValueError(f"{path} has no model_config (was it written by ssmkit train?)")
    saved_task = state.get("task") or {}
    name = args.task or saved_task.get("name")
    if not name or name == "bytes":
        raise ValueError("give --task NAME (the checkpoint's own task is not a synthetic task)")
    kwargs = {k: v for k, v in saved_task.items() if k != "name"} if name == saved_task.get("name") else {}
    kwargs.update(dict(args.task_arg))
    task = get_task(name, **kwargs)
    model = LanguageModel(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    cfg = TrainConfig(steps=1, batch_size=args.batch_size, progress=False, device=args.device, eval_seed=args.seed)
    trainer = Trainer(model, task, cfg)
    lengths = args.lengths or [task.seqlen]
    print(f"checkpoint step {state['step']}; task {task.describe()}")
    print(f"{'length':>8} {'acc':>8} {'seq_acc':>8} {'loss':>8}")
    with torch.no_grad():
        for L in lengths:
            t = task.with_seqlen(L) if L != task.seqlen else task
            bs = min(args.batch_size, args.sequences)
            res = trainer.evaluate(t, n_batches=math.ceil(args.sequences / bs), batch_size=bs)
            print(f"{L:>8} {res['acc']:>8.2%} {res['seq_acc']:>8.2%} {res['loss']:>8.4f}")
    return 0
