"""Train a language model on a synthetic task or on your own text files (byte level).

Examples::

    ssmkit train --task selective-copying --task-arg length=64 --task-arg n_tokens=4 --pattern MM --steps 500
    ssmkit train --data notes/ *.txt --preset tiny-mamba --seqlen 256 --steps 2000 --out runs/bytes
    torchrun --nproc_per_node=2 -m ssmkit train --data corpus.txt --pattern MMAM --out runs/ddp

Checkpoints (``--out DIR``) are written atomically every ``--checkpoint-every`` steps, and
``--resume`` continues from the newest one; metrics go to ``DIR/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "train"
HELP = "train a model on a synthetic task or on text files"


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val: object = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="a ModelConfig preset name (e.g. tiny-mamba); overrides the size flags")
    g.add_argument("--pattern", default="MM", help="layer pattern: M Mamba, 2 Mamba-2, A attention, D DeltaNet, "
                   "G gated DeltaNet, S S4D (default MM)")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--d-state", type=int, default=None, help="SSM state size for M / 2 / S layers")
    g.add_argument("--mlp", choices=("none", "swiglu", "moe"), default="none")
    g.add_argument("--no-gate", action="store_true", help="Mamba without the z gate (the paper's 'S6, no gate')")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("data (one of)")
    src.add_argument("--task", help="synthetic task: copying, selective-copying, induction-heads, mqar, listops")
    src.add_argument("--task-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                     help="a task size setting, e.g. length=256 (repeatable)")
    src.add_argument("--data", nargs="+", metavar="PATH", help="text files or directories (byte-level LM)")
    src.add_argument("--seqlen", type=int, default=256, help="sequence length for --data (default 256)")
    add_model_arguments(p)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=32, help="global batch size")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--out", help="output directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto")
    t.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    t.add_argument("--deterministic", action="store_true", help="deterministic CPU mode (bit-exact resume)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress output")


def build_model_config(args: argparse.Namespace, vocab_size: int):
    from ssmkit.models.config import ModelConfig

    if args.preset:
        return ModelConfig.from_name(args.preset, vocab_size=vocab_size)
    if not args.pattern:
        raise ValueError("--pattern must not be empty")
    kw: dict = {}
    if "M" in args.pattern:
        kw["ssm_cfg"] = {"use_gate": not args.no_gate}
        if args.d_state:
            kw["ssm_cfg"]["d_state"] = args.d_state
    if "2" in args.pattern and args.d_state:
        kw["mamba2_cfg"] = {"d_state": args.d_state}
    if "S" in args.pattern and args.d_state:
        kw["s4d_cfg"] = {"d_state": args.d_state}
    if "A" in args.pattern:
        kw["attn_cfg"] = {"n_heads": max(args.d_model // 64, 1) if args.d_model >= 64 else 1}
    return ModelConfig(d_model=args.d_model, n_layer=len(args.pattern), vocab_size=vocab_size,
                       layer_pattern=args.pattern, mlp=args.mlp, **kw)


def build_source(args: argparse.Namespace):
    """(train task, eval tasks) from --task / --data."""
    from ssmkit.tasks import get_task
    from ssmkit.training.data import ByteCorpus

    if bool(args.task) == bool(args.data):
        raise ValueError("give exactly one of --task NAME or --data PATH...")
    if args.data:
        if args.task_arg:
            raise ValueError("--task-arg applies to --task only")
        for path in args.data:
            if not Path(path).exists():
                raise FileNotFoundError(f"--data path {path} does not exist")
        corpus = ByteCorpus(list(args.data), length=args.seqlen)
        return corpus, {"val": corpus.split("val")}
    task = get_task(args.task, **dict(args.task_arg))
    return task, {"eval": task}


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.models.lm import LanguageModel
    from ssmkit.training.trainer import TrainConfig, Trainer

    task, eval_tasks = build_source(args)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR")
    mcfg = build_model_config(args, task.vocab_size)
    torch.manual_seed(args.seed)
    model = LanguageModel(mcfg)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup, args.steps), grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        accum_steps=args.accum, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        out_dir=args.out, seed=args.seed, device=args.device, amp=args.amp, strategy=args.strategy,
        deterministic=args.deterministic, threads=args.threads, progress=not args.quiet,
        log_every=max(1, min(50, args.steps // 20 or 1)),
    )
    trainer = Trainer(model, task, cfg, eval_tasks=eval_tasks, model_config=mcfg.to_dict())
    try:
        if args.resume and trainer.resume():
            print(f"resumed from step {trainer.step}")
        n_params = sum(p.numel() for p in model.parameters())
        if trainer.dist.is_main:
            print(f"model {mcfg.layer_pattern} d_model={mcfg.d_model}: {n_params:,} parameters; data: "
                  f"{task.describe()}; device {trainer.device}, world size {trainer.dist.world_size}")
        out = trainer.train()
        if trainer.dist.is_main:
            for name, res in out["eval"].items():
                print(f"{name}: loss {res['loss']:.4f}  acc {res['acc']:.2%}  seq_acc {res['seq_acc']:.2%}")
            print(f"{out['steps']} steps in {out['train_seconds']:.1f}s")
            if args.out:
                (Path(args.out) / "model_config.json").write_text(mcfg.to_json())
                if not cfg.checkpoint_every:
                    trainer.save()
                print(f"checkpoints and metrics in {args.out}")
    finally:
        trainer.close()
    return 0
