"""A trainer for any causal token model on any :class:`~ssmkit.tasks.base.Task` (or text corpus).

The model maps ``input_ids (batch, seqlen)`` to logits ``(batch, seqlen, vocab)`` (a tensor, or an
object with ``.logits`` and optionally ``.aux_loss``, like :class:`ssmkit.LanguageModel`'s
``LMOutput``). The loss is cross entropy over the task's scored positions only.

Features: AdamW with SSM-aware parameter groups, warmup + cosine schedule, gradient clipping,
gradient accumulation, bf16 autocast on GPU, periodic evaluation on fixed evaluation batches,
a progress bar (tqdm: loss, accuracy, tokens/s), metrics as JSON lines (and optionally TensorBoard or
Weights & Biases), atomic checkpoints that make resuming bit-exact in deterministic CPU mode, and
DDP/FSDP under torchrun.

With ``out_dir`` set, the trainer writes a checkpoint at the end of :meth:`Trainer.train` (and every
``checkpoint_every`` steps), and a :class:`ssmkit.LanguageModel` is also written there as a
loadable model directory (see :mod:`ssmkit.training.rundir`). SIGINT or SIGTERM during
:meth:`Trainer.train` finishes the current step, writes a checkpoint and raises
:class:`TrainingInterrupted`; under torchrun every rank stops at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ssmkit._checks import check_positive_int
from ssmkit.ops import context_parallel as cp
from ssmkit.tasks.base import Batch, Task, masked_cross_entropy, token_accuracy_counts, token_accuracy_tensors
from ssmkit.training import checkpoint as ckpt
from ssmkit.training import distributed as ddp
from ssmkit.training import rundir
from ssmkit.training.optim import build_optimizer
from ssmkit.training.schedule import build_scheduler


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch (all ranks, all accumulation micro-batches)
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    aux_loss_weight: float = 0.01  # MoE load-balancing loss
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    eval_batch_size: int | None = None
    eval_seed: int = 1234
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: str = "auto"  # "auto" (bf16 on GPU) | "bf16" | "none"
    deterministic: bool = False  # deterministic algorithms (and bit-exact resume on CPU)
    threads: int | None = None  # torch.set_num_threads
    strategy: str = "ddp"  # under torchrun: "ddp" | "fsdp"
    progress: bool = True
    stop_at_acc: float | None = None  # stop early once the periodic evaluation reaches this
    log: str | None = None  # also log metrics to "tensorboard" (out_dir/tb) or "wandb" (offline-able)
    context_parallel: int = 1  # ranks each sequence is sharded over (the model's set_context_parallel)
    activation_checkpointing: bool = False  # recompute each block in the backward (set_activation_checkpointing)

    def __post_init__(self):
        for name in ("steps", "batch_size", "accum_steps", "eval_batches", "log_every", "keep_checkpoints",
                     "context_parallel"):
            check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        if self.log not in (None, "tensorboard", "wandb"):
            raise ValueError(f"log must be None, 'tensorboard' or 'wandb', got {self.log!r}")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped :meth:`Trainer.train`; ``path`` is the checkpoint written (or None)."""

    def __init__(self, signum: int, step: int, path: Path | None, saved: bool = False):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "the checkpoint on rank 0" if saved else "no checkpoint (no out_dir)"
        super().__init__(f"stopped by {name} after step {step}; wrote {where}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def model_outputs(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, aux_loss) from a model's return value: a tensor or an object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out, None
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model must return logits or an object with .logits, got {type(out).__name__}")
    return logits, getattr(out, "aux_loss", None)


class Progress:
    """A tqdm progress bar on a terminal; periodic plain lines otherwise (logs, CI, parallel runs)."""

    def __init__(self, total: int, enabled: bool = True, prefix: str = "", stream=None, lines: bool = False,
                 initial: int = 0):
        self.total, self.enabled, self.prefix = total, enabled, prefix
        self.stream = stream or sys.stderr
        self.tty = not lines and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.bar = None
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=prefix.strip() or None, file=self.stream,
                            unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        parts = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.set_postfix(parts, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        el = time.perf_counter() - self.t0
        self.stream.write(f"{self.prefix}step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in parts.items())
                          + f" ({el:.0f}s)\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def set_deterministic(threads: int | None = None) -> None:
    """Deterministic algorithms and a fixed thread count: same numbers on every rerun (CPU)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)


class Trainer:
    """Train ``model`` on ``task`` (any object with ``sample(batch_size, generator) -> Batch``).

    ``eval_tasks`` maps a name to a task (e.g. the same task at 4x the length); evaluation uses
    fixed batches (``eval_seed``), so numbers are comparable between runs and models.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig | None = None,
        eval_tasks: dict[str, Task] | None = None,
        model_config: dict | None = None,
        forward: Callable | None = None,
        tokenizer=None,
    ):
        self.config = cfg = config or TrainConfig()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(task, "sample"):
            raise TypeError(f"task must have a sample(batch_size, generator) method, got {type(task).__name__}")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            set_deterministic(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.dist = ddp.init(device=self.device)
        if self.dist.enabled:
            # Collectives (the gradient and statistics all-reduces, FSDP's gathers) run on the
            # process group's device: the model and every tensor the step reduces live there.
            if self.dist.device.type != self.device.type:
                raise ValueError(f"device={cfg.device!r} does not match the process group, whose collectives "
                                 f"run on {self.dist.device}; use device={self.dist.device.type!r}")
            self.device = self.dist.device
        self.mesh = ddp.context_mesh(self.dist, cfg.context_parallel, self.device)
        # data-parallel replicas (rows of the batch) x context-parallel ranks (pieces of a sequence)
        self.dp_size, self.dp_rank, self.cp_rank = self.dist.world_size, self.dist.rank, 0
        if self.mesh is not None:
            self.dp_size, self.dp_rank = self.mesh["dp"].size(), self.mesh["dp"].get_local_rank()
            self.cp_rank = self.mesh["cp"].get_local_rank()
        per_rank, rem = divmod(cfg.batch_size, self.dp_size * cfg.accum_steps)
        if rem or per_rank == 0:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be a positive multiple of data-parallel size x accum_steps "
                f"= {self.dp_size} x {cfg.accum_steps}"
            )
        for flag, method in (("context_parallel", "set_context_parallel"),
                             ("activation_checkpointing", "set_activation_checkpointing")):
            if getattr(cfg, flag) not in (1, False) and not callable(getattr(model, method, None)):
                raise ValueError(f"{flag} needs a model with {method}() (a LanguageModel), "
                                 f"got {type(model).__name__}")
        if self.mesh is not None:
            model.set_context_parallel(self.mesh["cp"])
        if cfg.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.task = task
        self.eval_tasks = dict(eval_tasks or {})
        if not self.eval_tasks:
            self.eval_tasks = {"eval": task}
        self.model_config = model_config
        self.module = model.to(self.device)
        self.model = ddp.wrap_model(self.module, self.dist, cfg.strategy, self.device)
        self.forward = forward
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self.metrics_path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_amp else None
        self.history: list[dict] = []
        self.last_eval: dict[str, dict] = {}
        # Progress display: a prefix for each line, and plain lines even on a terminal (set by
        # callers that run several trainers at once, e.g. ``ssmkit reproduce``).
        self.progress_prefix = ""
        self.progress_lines = False
        # ``model_config`` of a LanguageModel: the run directory also gets a loadable model dir.
        self.tokenizer = tokenizer
        self._signal: int | None = None
        self._saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        self._logger = None
        if cfg.log is not None and self.dist.is_main:
            from ssmkit.training.loggers import make_logger

            self._logger = make_logger(cfg.log, self.out_dir, dataclasses.asdict(cfg))

    # ----------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.forward(model, inputs) if self.forward is not None else model(inputs)
        return model_outputs(out)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.metrics_path is not None and self.dist.is_main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._logger is not None:
            self._logger.log(record)

    # ----------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step (all accumulation micro-batches); returns loss/accuracy/tokens."""
        cfg, info = self.config, self.dist
        global_batch = self.task.sample(cfg.batch_size, self.generator)
        n_global = max(global_batch.n_scored, 1)
        per_rank = cfg.batch_size // self.dp_size
        local = self._shard(global_batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]).to(self.device)
        micro = per_rank // cfg.accum_steps
        self.model.train()
        # Statistics stay on the device until the end of the step: one read-back per step instead
        # of several per micro-batch (and NCCL can only all-reduce CUDA tensors).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(cfg.accum_steps):
            mb = local[i * micro : (i + 1) * micro]
            last = i == cfg.accum_steps - 1
            sync = contextlib.nullcontext() if (last or not info.enabled) else ddp.no_grad_sync(self.model)
            with sync:
                with self.autocast():
                    logits, aux = self.logits(self.model, mb.inputs)
                    s = masked_cross_entropy(logits, mb, reduction="sum")
                    # Divide by the *global* scored-token count (times world size, because DDP
                    # averages gradients over ranks): the gradient equals the one-big-batch one.
                    loss = s * (info.world_size / n_global)
                    if aux is not None:
                        loss = loss + cfg.aux_loss_weight * aux / cfg.accum_steps
                loss.backward()
            loss_sum += s.detach().double()
            counts += token_accuracy_tensors(logits.detach(), mb)[:2].double()
        # A pending SIGINT/SIGTERM rides along with the statistics: every rank learns of it in the
        # same step, so all of them stop (and save) together.
        stop = torch.full((1,), float(self._signal is not None), dtype=torch.float64, device=self.device)
        stats = torch.cat([loss_sum.reshape(1), counts, stop])
        ddp.all_reduce_sum(stats, info)
        if cfg.grad_clip is not None:
            gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor norm
                gnorm = gnorm.full_tensor()
        else:
            gnorm = torch.zeros(())
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = stats.cpu()  # the step's one read-back, after the optimizer's work is queued
        return {
            "loss": float(stats[0] / n_global),
            "acc": float(stats[1] / max(float(stats[2]), 1.0)),
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens": cfg.batch_size * global_batch.inputs.shape[1],
            "stop": bool(stats[3] > 0),
        }

    def _shard(self, batch: Batch) -> Batch:
        """This rank's piece of every sequence of ``batch`` (all of it without context parallelism)."""
        if self.mesh is None:
            return batch
        n = self.config.context_parallel
        return Batch(*(cp.shard(t, self.cp_rank, n) for t in (batch.inputs, batch.targets, batch.loss_mask)))

    def _eval_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of the whole sequences of ``batch`` (context parallel: each rank runs its shard
        and the shards' logits are gathered)."""
        if self.mesh is None:
            return self.logits(model, batch.inputs)[0]
        inputs = self._shard(batch).inputs
        logits = self.logits(model, inputs)[0]
        group = self.mesh["cp"]
        return cp.all_gather_seq(logits, group=group, bounds=cp.shard_bounds(inputs.shape[1], group, logits.device))

    @torch.no_grad()
    def evaluate(self, task: Task | None = None, n_batches: int | None = None,
                 batch_size: int | None = None, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        """Loss and accuracy on fixed batches of ``task`` (default: the training task).

        ``on_batch`` is called after each batch (e.g. to advance a progress bar)."""
        cfg = self.config
        task = task or self.task
        n_batches = n_batches or cfg.eval_batches
        batch_size = batch_size or cfg.eval_batch_size or max(cfg.batch_size // self.dp_size, 1)
        gen = torch.Generator().manual_seed(cfg.eval_seed)
        model = self.module
        was_training = model.training
        model.eval()
        tot = {"correct": 0, "total": 0, "seq_correct": 0, "seqs": 0}
        loss_sum = 0.0
        try:
            for _ in range(n_batches):
                batch: Batch = task.sample(batch_size, gen).to(self.device)
                with self.autocast():
                    logits = self._eval_logits(model, batch)
                loss_sum += float(masked_cross_entropy(logits, batch, reduction="sum"))
                for k, v in token_accuracy_counts(logits, batch).items():
                    tot[k] += v
                if on_batch is not None:
                    on_batch()
        finally:
            model.train(was_training)
        return {
            "loss": loss_sum / max(tot["total"], 1),
            "acc": tot["correct"] / max(tot["total"], 1),
            "seq_acc": tot["seq_correct"] / max(tot["seqs"], 1),
        }

    def evaluate_all(self) -> dict[str, dict]:
        res = {name: self.evaluate(t) for name, t in self.eval_tasks.items()}
        self.last_eval = res
        rec = {"step": self.step, "eval": res}
        self._log(rec)
        return res

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # Full (unsharded) tensors, the optimizer's state keyed by parameter name: the checkpoint
        # loads with any number of ranks and either strategy (FSDP gathers, on every rank).
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=ddp.is_fsdp(self.model))
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "data": {"generator": self.generator.get_state()},
            "train_config": {k: v for k, v in dataclasses.asdict(self.config).items()},
            "model_config": self.model_config,
            "task": self.task.config() if hasattr(self.task, "config") else None,
            "world_size": self.dist.world_size,
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step, and the model directory beside it.

        Every rank must call it (FSDP gathers the full state with collectives; all ranks wait at
        a barrier); rank 0 writes. Returns the checkpoint's path on rank 0, None elsewhere.
        """
        if self.out_dir is None:
            raise ValueError("out_dir is not set: cannot save a checkpoint")
        state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.out_dir, self.step, state, keep=self.config.keep_checkpoints)
            if self.model_config and hasattr(self.module, "save_pretrained"):
                rundir.save_model(self.out_dir, self.model_config, state["model"], self.tokenizer)
        ddp.barrier(self.dist)
        self._saved_step = self.step
        return path

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, self._optim_by_name(state["optimizer"]), options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["data"]["generator"])
        self.step = int(state["step"])
        self._saved_step = self.step
        ckpt.set_rng_state(state["rng"])

    def _optim_by_name(self, sd: dict) -> dict:
        """An optimizer state keyed by position (``torch.optim``'s own format, checkpoints written
        before names were used) -> keyed by parameter name, the positions being this optimizer's."""
        if not any(isinstance(k, int) for k in sd["state"]) and not any(
                isinstance(i, int) for g in sd["param_groups"] for i in g["params"]):
            return sd
        names = {id(p): n for n, p in ddp.unwrap(self.model).named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        return {"state": {order[i]: v for i, v in sd["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load ``path`` or the newest checkpoint in ``out_dir``; False if there is none."""
        if path is not None:
            state = ckpt.load_checkpoint(path)
        elif self.out_dir is not None:
            state = ckpt.load_latest(self.out_dir)
        else:
            state = None
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    # ----------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> dict:
        """Train until ``config.steps`` (or ``steps`` more steps); returns a summary.

        Per-step records (loss, acc, lr, tokens/s) go to ``self.history`` and, when ``out_dir`` is
        set, to ``out_dir/metrics.jsonl``.
        """
        cfg = self.config
        end = cfg.steps if steps is None else min(self.step + steps, cfg.steps)
        progress = Progress(end, enabled=cfg.progress and self.dist.is_main, prefix=self.progress_prefix,
                            lines=self.progress_lines, initial=self.step)
        t_start = time.perf_counter()
        tok_window, t_window = 0, time.perf_counter()
        losses: list[float] = []
        stopped_early = False
        restore = self._catch_signals()
        try:
            while self.step < end:
                rec = self.train_step()
                if rec["stop"]:
                    progress.close()
                    path = self.save() if self.out_dir is not None else None
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, self.step, path,
                                              saved=self.out_dir is not None)
                losses.append(rec["loss"])
                tok_window += rec["tokens"]
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}")
                if self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    tok_window, t_window = 0, now
                    self._log({"step": self.step, **{k: rec[k] for k in ("loss", "acc", "lr", "grad_norm")},
                               "tokens_per_s": tps, "elapsed_s": now - t_start})
                    progress.update(self.step, loss=rec["loss"], acc=rec["acc"], **{"tok/s": f"{tps:,.0f}"})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                    res = self.evaluate_all()
                    if cfg.stop_at_acc is not None and all(r["acc"] >= cfg.stop_at_acc for r in res.values()):
                        stopped_early = True
                        break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            progress.close()
            restore()
        final = self.evaluate_all()
        if self.out_dir is not None and self._saved_step != self.step:
            # Decided from memory, not from the files rank 0 may be writing right now: every rank
            # decides alike and reaches save()'s collectives.
            self.save()
        return {
            "steps": self.step,
            "losses": losses,
            "eval": final,
            "train_seconds": time.perf_counter() - t_start,
            "stopped_early": stopped_early,
        }

    def _catch_signals(self) -> Callable[[], None]:
        """Turn SIGINT/SIGTERM into a stop request checked after each step; returns the undo.

        A second SIGINT while the checkpoint is being written interrupts at once (KeyboardInterrupt).
        Signal handlers can only be set from the main thread: elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._signal = None

        def on_signal(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        ddp.cleanup(self.dist)
