"""Optional metric logging beside ``metrics.jsonl``: TensorBoard or Weights & Biases.

Both are optional extras (``pip install 'ssmkit[tensorboard]'`` / ``'ssmkit[wandb]'``);
:func:`check_available` tells, before any work starts, whether the package is installed.
W&B follows its own environment variables (``WANDB_MODE=offline`` logs locally, no account needed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(kind: str) -> None:
    """Raise ``ImportError`` (one line, with the install command) if ``kind``'s package is missing."""
    if kind not in PACKAGES:
        raise ValueError(f"log must be 'tensorboard' or 'wandb', got {kind!r}")
    if importlib.util.find_spec(PACKAGES[kind]) is None:
        raise ImportError(f"--log {kind}: the {PACKAGES[kind]} package is not installed "
                          f"(pip install 'ssmkit[{kind}]')")


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "step":
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class TensorBoardLogger:
    def __init__(self, out_dir: Path | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir or "runs") / "tb"))
        self.writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()))

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for k, v in _flatten(record).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out_dir: Path | None, config: dict):
        import wandb

        d = Path(out_dir or ".")
        d.mkdir(parents=True, exist_ok=True)
        # wandb records its background service in os.environ; close() puts the environment back.
        self._env = {k: v for k, v in os.environ.items() if k.startswith("WANDB")}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ssmkit"), dir=str(d), config=config,
                              name=d.name if out_dir else None)

    def log(self, record: dict) -> None:
        self.run.log(_flatten(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # stop the background service this process started
        for k in [k for k in os.environ if k.startswith("WANDB") and k not in self._env]:
            del os.environ[k]
        os.environ.update(self._env)


def make_logger(kind: str, out_dir: Path | None, config: dict):
    check_available(kind)
    return TensorBoardLogger(out_dir, config) if kind == "tensorboard" else WandbLogger(out_dir, config)
