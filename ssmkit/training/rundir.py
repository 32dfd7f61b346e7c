"""A training run's directory: what it holds, and the rules that keep runs from mixing.

A run directory holds the training checkpoints (``checkpoint-<step>.pt``), ``metrics.jsonl`` and,
beside them, the newest model as a loadable checkpoint directory (``config.json`` +
``model.safetensors`` + tokenizer files), so ``from_pretrained(RUN)``, ``ssmkit generate RUN`` and
``ssmkit convert RUN DST --to hf`` work on it directly.

:func:`prepare` runs before any training: a directory that already holds a run is refused unless
the new run continues it (``resume``) or replaces it (``force``: the old run's files are removed
first, files that are not the run's are left alone); resuming from a directory without a
checkpoint is refused too.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ssmkit.training import checkpoint as ckpt

# Files and folders a run writes (``tb``: TensorBoard events, ``wandb``: W&B offline runs).
RUN_FILES = ("metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "model_config.json")
RUN_DIRS = ("tb", "wandb")
_TMP = re.compile(r"^\.(checkpoint-\d+\.pt|config\.json|model\.safetensors|metrics\.jsonl)\..*\.tmp$")


def run_files(directory: str | os.PathLike) -> list[Path]:
    """The files (and log folders) of a training run found in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for _, p in ckpt.list_checkpoints(d)]
    found += [d / n for n in RUN_FILES if (d / n).is_file()]
    found += [d / n for n in RUN_DIRS if (d / n).is_dir()]
    found += [p for p in d.iterdir() if _TMP.match(p.name)]
    return found


def prepare(directory: str | os.PathLike, *, resume: bool = False, force: bool = False,
            remove: bool = True) -> Path:
    """Check (and with ``force`` clear) ``directory`` before a run writes into it.

    ``resume``: the directory must hold a readable checkpoint. Otherwise a directory holding
    another run is refused (``FileExistsError``) unless ``force``, which removes that run's files
    (only when ``remove``: under torchrun only rank 0 removes them). Returns the directory.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"--out {d}: exists and is not a directory")
    if resume and force:
        raise ValueError("--resume and --force contradict each other: --resume continues the run in --out, "
                         "--force replaces it")
    if resume:
        if not ckpt.list_checkpoints(d):
            what = "does not exist" if not d.exists() else "holds no checkpoint-*.pt"
            raise FileNotFoundError(f"--resume: {d} {what}, so there is nothing to resume; drop --resume "
                                    "to start a new run there")
        return d
    existing = run_files(d)
    if existing and not force:
        names = ", ".join(sorted(p.name for p in existing)[:3]) + (", ..." if len(existing) > 3 else "")
        raise FileExistsError(f"--out {d} already holds a training run ({names}); pass --resume to continue "
                              "it, --force to replace it, or choose another --out")
    if existing and remove:
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    return d


def save_model(directory: str | os.PathLike, model_config: dict, state_dict: dict, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) of a
    :class:`~ssmkit.LanguageModel` into ``directory``, each file atomically.

    ``state_dict`` may be the full (gathered) state of a sharded model; tied head weights are
    left out as :func:`ssmkit.models.checkpoint.save_pretrained` leaves them out.
    """
    import json

    import torch
    from safetensors.torch import save_file

    from ssmkit.models.checkpoint import atomic_write, atomic_write_text
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.formats import get_format

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(model_config)
    fmt = get_format("ssmkit")
    tensors = {}
    for k, v in state_dict.items():
        if config.tie_embeddings and k == "lm_head.weight":
            continue
        if not isinstance(v, torch.Tensor):
            continue
        tensors[fmt.key_out(k)] = v.detach().to("cpu").contiguous()
    atomic_write(d / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(d / "config.json", json.dumps(fmt.from_model_config(config), indent=2) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(str(d))
    return d
