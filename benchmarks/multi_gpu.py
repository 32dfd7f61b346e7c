"""Training on several GPUs: DDP and FSDP2 against one GPU (the loss curve at the same global
batch, tokens/s per GPU at the same per-GPU batch), checkpoints resumed on another number of
ranks, and the longest sequence context parallelism trains.

Launched once per rank count N, one process per GPU; each launch writes
``OUT_DIR/multi_gpu_<N>rank_<card>_<date>.json`` and a PNG beside it. Parts (``--parts``):

* ``loss``: ``--steps`` steps of ``--preset`` (``hybrid-370m``: Mamba-2 + attention + MoE) on MQAR,
  bf16 autocast, global batch ``--global-batch`` (micro-batches of ``--micro-batch`` rows per rank,
  the rest by gradient accumulation), with DDP and with FSDP2 (one process: plain). The mean loss
  of the last ``--last`` steps against the one-GPU launch's (``--baseline``): relative difference
  <= 1e-2. With ``--ckpt-dir``, each run writes its checkpoint of step ``--resume-at`` to
  ``CKPT_DIR/<strategy>-<N>ranks``.
* ``scaling`` (weak scaling): ``--micro-batch`` rows per GPU, median step time over
  ``--timed-steps`` steps: tokens/s per GPU against the one-GPU figure (target >= 90%).
* ``resume``: the checkpoints the ``--resume-from-ranks M`` launch wrote in ``--ckpt-dir``,
  resumed on these N ranks for ``--resume-steps`` steps: the losses against this launch's own
  uninterrupted curve at the same steps (the global batch is the same).
* ``context``: :mod:`benchmarks/context_parallel.py <context_parallel>`'s sweep for one sequence
  over N ranks (``--cp-preset``, default ``mamba2-1.3b``, activation checkpointing): the longest
  length that fits, tokens/s (target: 1M tokens on 8 H100s); and the loss and gradient of one
  ``--cp-check-seqlen`` sequence over the N ranks against rank 0 alone (bf16 tolerance).

GPUs (NCCL; NVLink multicast stays as the environment sets it: keep ``NCCL_NVLS_ENABLE=0``)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    torchrun --nproc_per_node=1 benchmarks/multi_gpu.py --ckpt-dir ckpt --out-dir results
    B=$(ls results/multi_gpu_1rank_*.json | tail -1)
    for N in 2 4 8; do
      torchrun --nproc_per_node=$N benchmarks/multi_gpu.py --ckpt-dir ckpt --out-dir results \\
          --baseline $B --resume-from-ranks 1
    done
    torchrun --nproc_per_node=1 benchmarks/multi_gpu.py --ckpt-dir ckpt --out-dir results \\
        --parts resume --resume-from-ranks 8 --baseline $B

CPU, gloo, tiny sizes (``--nproc N`` spawns the processes)::

    python benchmarks/multi_gpu.py --device cpu --preset tiny-hybrid --seqlen 32 --global-batch 8 \\
        --micro-batch 2 --steps 20 --last 5 --resume-at 10 --resume-steps 4 --cp-preset tiny-mamba2 \\
        --cp-start-seqlen 64 --cp-max-seqlen 256 --ckpt-dir ckpt --out-dir results
    python benchmarks/multi_gpu.py --nproc 2 ...same flags... --baseline results/multi_gpu_1rank_cpu_*.json \\
        --resume-from-ranks 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import context_parallel as cp_bench  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _results import result_path, write_json  # noqa: E402

PARTS = ("loss", "scaling", "resume", "context")
LOSS_TOLERANCE = 1e-2  # relative difference of the mean loss over the last --last steps
SCALING_TARGET = 0.9  # tokens/s per GPU against one GPU


def _strategies(n: int) -> tuple[str, ...]:
    return ("single",) if n == 1 else ("ddp", "fsdp")


def _ckpt_dir(args, strategy: str, n: int) -> str:
    return os.path.join(args.ckpt_dir, f"{strategy}-{n}ranks")


def _trainer(args, device, strategy: str, global_batch: int, world: int, out_dir: str | None = None):
    from ssmkit import LanguageModel, ModelConfig
    from ssmkit.tasks import get_task
    from ssmkit.training import TrainConfig, Trainer

    torch.manual_seed(0)  # the same initial weights on every rank and in every launch
    mcfg = ModelConfig.from_name(args.preset)
    vocab = min(args.task_vocab, mcfg.vocab_size)
    task = get_task("mqar", length=args.seqlen, vocab=vocab, num_kv_pairs=max(1, min(args.seqlen // 8, vocab // 4)))
    accum = max(1, global_batch // (world * args.micro_batch))
    cfg = TrainConfig(steps=args.steps, batch_size=global_batch, accum_steps=accum, lr=args.lr,
                      warmup_steps=min(args.warmup, args.steps), progress=False, seed=1, device=str(device),
                      strategy="ddp" if strategy == "single" else strategy, out_dir=out_dir, eval_batches=1,
                      keep_checkpoints=1)
    return Trainer(LanguageModel(mcfg), task, cfg)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def loss_curves(args, device, rank, world, baseline) -> dict:
    out = {}
    for strategy in _strategies(world):
        ckpt = _ckpt_dir(args, strategy, world) if args.ckpt_dir else None
        tr = _trainer(args, device, strategy, args.global_batch, world, ckpt)
        losses, t0 = [], time.perf_counter()
        for _ in range(args.steps):
            losses.append(tr.train_step()["loss"])
            if ckpt and tr.step == args.resume_at:
                tr.save()
        row = {"losses": losses, "mean_last": statistics.fmean(losses[-args.last:]),
               "seconds": time.perf_counter() - t0, "accum_steps": tr.config.accum_steps}
        ref = (baseline or {}).get("loss", {}).get("single")
        if ref is not None:
            row["rel_diff_vs_1gpu"] = _rel(row["mean_last"], ref["mean_last"])
            row["pass"] = row["rel_diff_vs_1gpu"] <= LOSS_TOLERANCE
        out[strategy] = row
        tr.close()
        if rank == 0:
            extra = f", {row['rel_diff_vs_1gpu']:.2e} from 1 GPU" if "rel_diff_vs_1gpu" in row else ""
            print(f"{strategy} on {world}: mean loss of the last {args.last} steps {row['mean_last']:.4f}{extra}",
                  flush=True)
    return out


def weak_scaling(args, device, rank, world, baseline) -> dict:
    out = {}
    for strategy in _strategies(world):
        tr = _trainer(args, device, strategy, args.micro_batch * world, world)
        for _ in range(args.warmup_steps_timing):
            tr.train_step()
        times = []
        for _ in range(args.timed_steps):
            t0 = time.perf_counter()
            tr.train_step()  # ends with the step's read-back of its statistics (a device sync)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row = {"step_ms": step_s * 1e3, "tokens_per_s_per_gpu": args.micro_batch * args.seqlen / step_s}
        ref = (baseline or {}).get("scaling", {}).get("single")
        if ref is not None:
            row["efficiency_vs_1gpu"] = row["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"]
            row["pass"] = row["efficiency_vs_1gpu"] >= SCALING_TARGET
        out[strategy] = row
        tr.close()
        if rank == 0:
            extra = f" ({row['efficiency_vs_1gpu']:.0%} of 1 GPU)" if "efficiency_vs_1gpu" in row else ""
            print(f"{strategy} on {world}: {row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU{extra}", flush=True)
    return out


def resumed(args, device, rank, world, curves) -> dict:
    from ssmkit.training.checkpoint import checkpoint_path

    m = args.resume_from_ranks
    out = {}
    for strategy in _strategies(world):
        for source in _strategies(m) if world == 1 else [("single" if m == 1 else strategy)]:
            path = checkpoint_path(_ckpt_dir(args, source, m), args.resume_at)
            tr = _trainer(args, device, strategy, args.global_batch, world)
            if not tr.resume(path):
                raise FileNotFoundError(f"no checkpoint {path}: run the {m}-rank launch with --ckpt-dir first")
            losses = [tr.train_step()["loss"] for _ in range(args.resume_steps)]
            tr.close()
            row = {"from": f"{source} on {m}", "start_step": args.resume_at, "losses": losses}
            ref = (curves.get(strategy) or curves.get("single") or {}).get("losses")
            if ref is not None:
                want = ref[args.resume_at:args.resume_at + args.resume_steps]
                row["max_rel_diff_vs_uninterrupted"] = max(_rel(a, b) for a, b in zip(losses, want))
                row["pass"] = _rel(statistics.fmean(losses), statistics.fmean(want)) <= LOSS_TOLERANCE
            out[f"{strategy}<-{source}{m}"] = row
            if rank == 0:
                extra = (f": max per-step difference {row['max_rel_diff_vs_uninterrupted']:.2e} from the "
                         "uninterrupted run" if "max_rel_diff_vs_uninterrupted" in row else "")
                print(f"{strategy} on {world} resumed from {source} on {m} at step {args.resume_at}{extra}",
                      flush=True)
    return out


BF16_TOLERANCE = 2.0**-5  # 8 units of bfloat16 rounding: relative, loss and gradient norm


def _loss_and_grads(model, ids, labels, device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(ids.to(device), labels=labels.to(device), return_logits=False).loss
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
                       for p in model.parameters()])
    return loss.detach().float().reshape(1), grads


def context_check(args, device, rank, world) -> dict:
    """One sequence of ``--cp-check-seqlen`` over the N ranks against the whole of it on rank 0
    alone (bf16 autocast on GPUs): the loss and the gradient (the ranks' gradients summed), as
    relative differences."""
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel
    from ssmkit.ops import context_parallel as cp

    def build(group):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig.from_name(args.cp_preset)).to(device).train()
        model.set_context_parallel(group)
        return model

    group = dist.new_group(list(range(world)))
    model = build(group)
    ids = torch.randint(0, model.config.vocab_size, (1, args.cp_check_seqlen),
                        generator=torch.Generator().manual_seed(0))
    shard = cp.shard(ids, rank, world)
    loss, grads = _loss_and_grads(model, shard, shard, device)
    dist.all_reduce(loss, group=group)  # each rank's loss is its share of the sequence's mean
    dist.all_reduce(grads, group=group)
    del model
    if rank != 0:
        return {}
    ref_loss, ref_grads = _loss_and_grads(build(None), ids, ids, device)
    out = {"seqlen": args.cp_check_seqlen, "loss": float(loss), "loss_1gpu": float(ref_loss),
           "loss_rel_diff": float((loss - ref_loss).abs() / ref_loss.abs()),
           "grad_rel_diff": float((grads - ref_grads).norm() / ref_grads.norm()), "tolerance": BF16_TOLERANCE}
    out["pass"] = max(out["loss_rel_diff"], out["grad_rel_diff"]) <= BF16_TOLERANCE
    print(f"context parallel over {world}, {args.cp_check_seqlen} tokens against 1 GPU: loss {out['loss_rel_diff']:.1e}, "
          f"gradient {out['grad_rel_diff']:.1e} (relative)", flush=True)
    return out


def context(args, device, rank, world) -> dict:
    argv = ["--ranks", str(world), "--preset", args.cp_preset, "--activation-checkpointing",
            "--start-seqlen", str(args.cp_start_seqlen), "--max-seqlen", str(args.cp_max_seqlen),
            "--steps", str(args.cp_steps)]
    if args.cp_memory_gib is not None:
        argv += ["--memory-gib", str(args.cp_memory_gib)]
    if device.type == "cpu":
        argv.append("--cpu")
    out = cp_bench.measure(rank, world, cp_bench.parser().parse_args(argv))["ranks"].get(world) or {}
    if world > 1:
        out["equals_1gpu"] = context_check(args, device, rank, world)
    return out


def measure(rank: int, world: int, args) -> dict:
    """Every process runs this; rank 0's return value is the report."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    baseline = None
    if args.baseline:
        import json

        with open(args.baseline) as f:
            baseline = json.load(f)
    name = cp_bench.machine(device)
    report = {"machine": f"{world} x {name}" if cuda else name, "device": device.type, "ranks": world,
              "date": datetime.date.today().isoformat(), "torch": str(torch.__version__),
              "backend": dist.get_backend() if dist.is_initialized() else None,
              "command": " ".join(sys.argv), "args": vars(args), "baseline": args.baseline,
              "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")
                      if k in os.environ}}
    if rank == 0:
        print(f"{report['machine']}, torch {torch.__version__}", flush=True)
    if "loss" in args.parts:
        report["loss"] = loss_curves(args, device, rank, world, baseline)
    if "scaling" in args.parts:
        report["scaling"] = weak_scaling(args, device, rank, world, baseline)
    if "resume" in args.parts and args.resume_from_ranks:
        # against this launch's uninterrupted curve, else the one-GPU launch's
        report["resume"] = resumed(args, device, rank, world, report.get("loss") or (baseline or {}).get("loss", {}))
    if "context" in args.parts:
        report["context_parallel"] = context(args, device, rank, world)
    return report


def _spawned(rank, world, args):  # (ssmkit.testing.run_on_ranks: a gloo group on the CPU)
    return measure(rank, world, args)


def plot(report: dict, path: str) -> None:
    """Loss curves (and the one-GPU curve of the baseline) and tokens/s per GPU."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG", flush=True)
        return
    import json

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = None
    if report.get("baseline"):
        with open(report["baseline"]) as f:
            base = json.load(f)
    for label, curves in (("1 GPU ", (base or {}).get("loss", {})), (f"{report['ranks']} ranks ", report.get("loss", {}))):
        for strategy, row in curves.items():
            ax1.plot(range(1, len(row["losses"]) + 1), row["losses"], label=label + strategy)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    if ax1.lines:
        ax1.legend()
    rows = {"1 GPU": (base or {}).get("scaling", {}).get("single")}
    rows.update({f"{report['ranks']} ranks {s}": r for s, r in report.get("scaling", {}).items()})
    rows = {k: v for k, v in rows.items() if v}
    ax2.bar(list(rows), [v["tokens_per_s_per_gpu"] for v in rows.values()])
    ax2.set_ylabel("tokens/s per GPU (same per-GPU batch)")
    fig.suptitle(f"{report['args']['preset']}: {report['machine']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--nproc", type=int, default=1, help="CPU only: spawn this many gloo processes")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--preset", default="hybrid-370m")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--task-vocab", type=int, default=8192, help="MQAR's vocabulary (at most the model's)")
    p.add_argument("--global-batch", type=int, default=32, help="rows per step over all ranks (loss, resume)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per rank per forward (and per GPU in scaling)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--last", type=int, default=50, help="steps whose mean loss is compared")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20, help="learning-rate warmup steps")
    p.add_argument("--warmup-steps-timing", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--timed-steps", type=int, default=20)
    p.add_argument("--ckpt-dir", default=None, help="where each run writes (and resume reads) checkpoints")
    p.add_argument("--resume-at", type=int, default=100, help="the step whose checkpoint is written and resumed")
    p.add_argument("--resume-steps", type=int, default=20)
    p.add_argument("--resume-from-ranks", type=int, default=0, help="resume the checkpoints of this launch's N")
    p.add_argument("--baseline", default=None, help="the one-GPU launch's JSON")
    p.add_argument("--cp-preset", default="mamba2-1.3b")
    p.add_argument("--cp-start-seqlen", type=int, default=65536)
    p.add_argument("--cp-max-seqlen", type=int, default=2**21)
    p.add_argument("--cp-steps", type=int, default=2)
    p.add_argument("--cp-check-seqlen", type=int, default=4096,
                   help="the sequence whose loss and gradient over N ranks are compared with 1 GPU")
    p.add_argument("--cp-memory-gib", type=float, default=None, help="default: 90%% of the GPU, 2 GiB on the CPU")
    p.add_argument("--out-dir", default="results")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    for name in ("nproc", "seqlen", "task_vocab", "global_batch", "micro_batch", "steps", "last", "timed_steps",
                 "resume_at", "resume_steps", "cp_start_seqlen", "cp_max_seqlen", "cp_steps", "cp_check_seqlen"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.last > args.steps or args.resume_at >= args.steps:
        p.error(f"--last ({args.last}) and --resume-at ({args.resume_at}) must be below --steps ({args.steps})")
    if args.resume_from_ranks and not args.ckpt_dir:
        p.error("--resume-from-ranks needs --ckpt-dir (where that launch wrote its checkpoints)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.nproc > 1 and args.device != "cpu":
        p.error("--nproc spawns CPU processes; on GPUs launch with torchrun --nproc_per_node=N")
    if args.baseline and not os.path.isfile(args.baseline):
        p.error(f"--baseline {args.baseline} does not exist")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check(p, args)
    from ssmkit.training import distributed as ddp

    if "WORLD_SIZE" in os.environ:  # under torchrun: NCCL on GPUs (bound to LOCAL_RANK's GPU), gloo on the CPU
        info = ddp.init(device=torch.device(args.device))
        report = measure(info.rank, info.world_size, args)
        rank, world = info.rank, info.world_size
        ddp.cleanup(info)
    elif args.nproc > 1:
        from ssmkit.testing import run_on_ranks

        rank, world = 0, args.nproc
        report = run_on_ranks(_spawned, world, args, timeout_s=600)[0]
    else:
        rank, world = 0, 1
        report = measure(0, 1, args)
    if rank == 0:
        path = result_path(args.out_dir, f"multi_gpu_{world}rank", args.device)
        write_json(path, report)
        plot(report, os.path.splitext(path)[0] + ".png")
        print(f"{report['machine']}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
