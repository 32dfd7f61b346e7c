"""Train a language model on a synthetic task or on your own text files (byte level).

Examples:
  ssmkit train --task selective-copying --task-arg length=64 --task-arg n_tokens=4 --pattern MM \\
      --steps 500 --out runs/sc
  ssmkit train --data notes/ book.txt --preset tiny-mamba --seqlen 256 --steps 2000 --out runs/bytes
  torchrun --nproc_per_node=2 -m ssmkit train --data book.txt --out runs/ddp

The run directory (--out, default runs/<date>-<time>, printed) receives:
  checkpoint-<step>.pt      the newest two training checkpoints (--resume continues from them)
  config.json, model.safetensors
                            the newest model, loadable as is: ssmkit generate RUN,
                            ssmkit convert RUN DST --to hf, ssmkit.from_pretrained(RUN)
  metrics.jsonl             loss, accuracy, learning rate, tokens/s; evaluations
A checkpoint is written at the end, every --checkpoint-every steps, and when Ctrl-C or SIGTERM
stops the run. A directory that holds another run is refused unless --resume or --force is given.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ssmkit.cli import args as A

NAME = "train"
HELP = "train a model on a synthetic task or on text files"


def _pattern(text: str) -> str:
    from ssmkit.models.config import LAYER_LETTERS

    bad = sorted(set(text) - set(LAYER_LETTERS))
    if not text or bad:
        raise argparse.ArgumentTypeError(
            f"expected letters from {''.join(LAYER_LETTERS)} ("
            + ", ".join(f"{k} {v}" for k, v in LAYER_LETTERS.items()) + f"), got {text!r}")
    return text


_pattern.__name__ = "pattern"


def _preset(text: str) -> str:
    from ssmkit.models.config import PRESETS

    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose from {', '.join(sorted(PRESETS))}")
    return text


_preset.__name__ = "preset"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", type=_preset, help="a ModelConfig preset name (e.g. tiny-mamba); overrides the "
                   "size flags below")
    g.add_argument("--pattern", type=_pattern, default="MM", help="layer pattern, one letter per layer: M Mamba, "
                   "2 Mamba-2, A attention, D DeltaNet, G gated DeltaNet, S S4D, F MLP, "
                   "P Mamba-2 + attention in parallel")
    g.add_argument("--d-model", type=A.positive_int, default=64, help="model width")
    g.add_argument("--d-state", type=A.positive_int, default=None,
                   help="SSM state size for M / 2 / S layers (default: the layer's own)")
    g.add_argument("--mlp", choices=("none", "swiglu", "moe"), default="none", help="MLP after each mixer")
    g.add_argument("--no-gate", action="store_true", help="Mamba without the z gate (the paper's 'S6, no gate')")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("data (one of --task or --data)")
    src.add_argument("--task", help="synthetic task: copying, selective-copying, induction-heads, mqar, listops, pathfinder")
    src.add_argument("--task-arg", type=A.key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="a task size setting, e.g. length=256 (repeatable)")
    src.add_argument("--data", nargs="+", metavar="PATH", help="text files or directories (byte-level LM)")
    src.add_argument("--seqlen", type=A.int_range(2), default=256, help="sequence length for --data")
    add_model_arguments(p)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=A.positive_int, default=1000, help="optimizer steps")
    t.add_argument("--batch-size", type=A.positive_int, default=32,
                   help="global batch size (a multiple of world size x --accum)")
    t.add_argument("--lr", type=A.float_range(0, lo_open=True), default=1e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=A.float_range(0), default=0.1, help="AdamW weight decay")
    t.add_argument("--warmup", type=A.nonneg_int, default=100, help="linear warmup steps")
    t.add_argument("--grad-clip", type=A.float_range(0), default=1.0, help="gradient norm clip; 0 turns it off")
    t.add_argument("--accum", type=A.positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--eval-every", type=A.nonneg_int, default=0, help="evaluate every N steps; 0: only at the end")
    t.add_argument("--checkpoint-every", type=A.nonneg_int, default=0,
                   help="also checkpoint every N steps; 0: only at the end (and on Ctrl-C / SIGTERM)")
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/<date>-<time>, printed)")
    rf = t.add_mutually_exclusive_group()
    rf.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    rf.add_argument("--force", action="store_true", help="replace the run already in --out (its files are removed)")
    t.add_argument("--seed", type=A.nonneg_int, default=0, help="seed of the weights and the data")
    t.add_argument("--device", type=A.device(), default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto",
                   help="bf16 autocast: auto = on CUDA only; bf16 needs CUDA")
    t.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="data parallelism under torchrun (fsdp shards the model)")
    t.add_argument("--context-parallel", type=A.positive_int, default=1, metavar="N",
                   help="shard each sequence over N ranks (long sequences; under torchrun, N divides the "
                        "world size; the rest is data parallelism)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward instead of keeping its activations")
    t.add_argument("--deterministic", action="store_true", help="deterministic CPU mode (bit-exact resume)")
    t.add_argument("--threads", type=A.positive_int, default=None, help="CPU threads (default: torch's choice)")
    t.add_argument("--log", choices=("tensorboard", "wandb"), default=None,
                   help="also log metrics to TensorBoard (DIR/tb) or Weights & Biases (needs the extra)")
    t.add_argument("--quiet", action="store_true", help="no progress output")


def check_task_args(task: str, pairs: list[tuple[str, object]]) -> dict:
    """``--task-arg`` pairs checked against the task's fields: names and types."""
    import dataclasses

    from ssmkit.tasks import TASKS

    key = task.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise A.CLIError(f"--task: unknown task {task!r}; choose from {', '.join(TASKS)}")
    fields = {f.name: f for f in dataclasses.fields(TASKS[key])}
    out = {}
    for k, v in pairs:
        if k not in fields:
            raise A.CLIError(f"--task-arg {k}: task {key!r} has no such option; options: {', '.join(sorted(fields))}")
        want = type(fields[k].default) if fields[k].default is not dataclasses.MISSING else None
        if want is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise A.CLIError(f"--task-arg {k}: expected an integer, got {v!r}")
        if want is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise A.CLIError(f"--task-arg {k}: expected a number, got {v!r}")
        if want is bool and not isinstance(v, bool):
            raise A.CLIError(f"--task-arg {k}: expected true or false, got {v!r}")
        out[k] = v
    return out


def build_model_config(args: argparse.Namespace, vocab_size: int):
    from ssmkit.models.config import ModelConfig

    if args.preset:
        return ModelConfig.from_name(args.preset, vocab_size=vocab_size)
    kw: dict = {}
    if "M" in args.pattern:
        kw["ssm_cfg"] = {"use_gate": not args.no_gate}
        if args.d_state:
            kw["ssm_cfg"]["d_state"] = args.d_state
    if set("2P") & set(args.pattern) and args.d_state:
        kw["mamba2_cfg"] = {"d_state": args.d_state}
    if "3" in args.pattern and args.d_state:
        kw["mamba3_cfg"] = {"d_state": args.d_state}
    if "S" in args.pattern and args.d_state:
        kw["s4d_cfg"] = {"d_state": args.d_state}
    if set("AP") & set(args.pattern):
        kw["attn_cfg"] = {"n_heads": max(args.d_model // 64, 1) if args.d_model >= 64 else 1}
    return ModelConfig(d_model=args.d_model, n_layer=len(args.pattern), vocab_size=vocab_size,
                       layer_pattern=args.pattern, mlp=args.mlp, **kw)


def build_source(args: argparse.Namespace):
    """(train task, eval tasks, tokenizer) from --task / --data."""
    from ssmkit.models.tokenizer import ByteTokenizer
    from ssmkit.tasks import get_task
    from ssmkit.training.data import ByteCorpus

    if bool(args.task) == bool(args.data):
        raise A.CLIError("give exactly one of --task NAME or --data PATH...")
    if args.data:
        if args.task_arg:
            raise A.CLIError("--task-arg applies to --task only")
        for path in args.data:
            if not Path(path).exists():
                raise A.CLIError(f"--data path {path} does not exist")
        corpus = ByteCorpus(list(args.data), length=args.seqlen)
        return corpus, {"val": corpus.split("val")}, ByteTokenizer()
    task = get_task(args.task, **check_task_args(args.task, args.task_arg))
    return task, {"eval": task}, None


def _check_flags(args: argparse.Namespace, world: int) -> None:
    import torch

    if args.strategy == "fsdp" and world <= 1:
        raise A.CLIError("--strategy fsdp shards the model over processes: run under torchrun "
                         "(torchrun --nproc_per_node=N -m ssmkit train ...)")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.amp == "bf16" and not cuda:
        raise A.CLIError("--amp bf16 needs a CUDA device (this run is on the CPU); use --amp auto or none")
    if args.context_parallel > 1 and world % args.context_parallel:
        raise A.CLIError(f"--context-parallel {args.context_parallel} must divide the number of processes "
                         f"({world}); run under torchrun --nproc_per_node=N")
    dp = world // args.context_parallel if world % args.context_parallel == 0 else world
    if args.batch_size % (dp * args.accum):
        raise A.CLIError(f"--batch-size {args.batch_size} must be a multiple of data-parallel size x --accum "
                         f"= {dp} x {args.accum}")
    if args.preset and (args.d_state or args.no_gate or args.mlp != "none"):
        raise A.CLIError("--preset sets the model: drop --d-state, --no-gate and --mlp, or drop --preset")
    if args.log:
        from ssmkit.training.loggers import check_available

        check_available(args.log)


def _check_resume_matches(out: Path, mcfg) -> None:
    """--resume with other model flags than the run's: say which setting differs."""
    from ssmkit.training import checkpoint as ckpt

    state = ckpt.load_latest(out)
    if state is None:
        raise A.CLIError(f"--resume: no readable checkpoint in {out}")
    saved = state.get("model_config") or {}
    now = mcfg.to_dict()
    first = ["layer_pattern", "d_model", "n_layer", "vocab_size", "mlp"]
    keys = first + sorted((set(saved) | set(now)) - set(first))
    diff = [k for k in keys if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise A.CLIError(f"--resume: the run in {out} has a model with {k}={saved.get(k)!r}, these flags build "
                         f"{k}={now.get(k)!r}; give the run's model flags (or drop --resume and use another --out)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.cli.main import Interrupted
    from ssmkit.models.lm import LanguageModel
    from ssmkit.training import rundir
    from ssmkit.training.trainer import TrainConfig, Trainer, TrainingInterrupted

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _check_flags(args, world)
    if args.out is None:
        if args.resume:
            raise A.CLIError("--resume needs --out DIR (the run to continue)")
        if world > 1:
            raise A.CLIError("--out DIR is required under torchrun (every rank must write to the same run)")
        args.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out = A.check_output_dir("--out", args.out)
    rundir.prepare(out, resume=args.resume, force=args.force, remove=rank == 0)
    task, eval_tasks, tokenizer = build_source(args)
    mcfg = build_model_config(args, task.vocab_size)
    if args.resume:
        _check_resume_matches(out, mcfg)
    torch.manual_seed(args.seed)
    model = LanguageModel(mcfg)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup, args.steps), grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        accum_steps=args.accum, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        out_dir=str(out), seed=args.seed, device=args.device, amp=args.amp, strategy=args.strategy,
        deterministic=args.deterministic, threads=args.threads, progress=not args.quiet,
        log_every=max(1, min(50, args.steps // 20 or 1)), log=args.log,
        context_parallel=args.context_parallel, activation_checkpointing=args.activation_checkpointing,
    )
    trainer = Trainer(model, task, cfg, eval_tasks=eval_tasks, model_config=mcfg.to_dict(), tokenizer=tokenizer)
    main = trainer.dist.is_main
    try:
        if args.resume and trainer.resume() and main:
            print(f"resumed from step {trainer.step}")
        if main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {mcfg.layer_pattern} d_model={mcfg.d_model}: {n_params:,} parameters; data: "
                  f"{task.describe()}; device {trainer.device}, world size {trainer.dist.world_size}; "
                  f"run directory {out}", flush=True)
        try:
            result = trainer.train()
        except TrainingInterrupted as e:
            msg = f"{e}; continue with --resume --out {out}" if main else ""
            raise Interrupted(msg, 128 + int(e.signum)) from None
        if main:
            for name, res in result["eval"].items():
                print(f"{name}: loss {res['loss']:.4f}  acc {res['acc']:.2%}  seq_acc {res['seq_acc']:.2%}")
            print(f"{result['steps']} steps in {result['train_seconds']:.1f}s; model, checkpoint and metrics in "
                  f"{out} (ssmkit generate {out} --prompt ..., ssmkit eval {out})")
    finally:
        trainer.close()
        if trainer.dist.initialized_here:
            from ssmkit.cli import main as cli_main

            cli_main.hard_exit = True
    return 0
