"""AdamW with the parameter groups SSMs need.

No weight decay on: the SSM's ``A_log`` and ``D``, the Δ bias (``dt_proj.bias`` in Mamba,
``dt_bias`` in Mamba-2), every norm weight and bias (any parameter with fewer than 2 dimensions),
and any parameter marked ``_no_weight_decay = True``. Decaying A or Δ would pull the SSM's time
scales towards zero, which the Mamba and S4 recipes avoid.

A parameter may carry an ``_optim`` dict (the S4 convention: e.g. ``{"lr": 1e-3,
"weight_decay": 0.0}`` on the SSM's A, B and Δ); its entries override the group defaults, and
parameters with equal overrides share one group.
"""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("A_log", "D", "dt_bias")
NO_DECAY_SUFFIXES = ("dt_proj.bias",)


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True unless ``param`` (called ``name`` in ``model.named_parameters()``) is exempt."""
    if getattr(param, "_no_weight_decay", False):
        return False
    leaf = name.rsplit(".", 1)[-1]
    if leaf in NO_DECAY_NAMES or name.endswith(NO_DECAY_SUFFIXES):
        return False
    if param.dim() < 2:  # biases and norm weights
        return False
    return True


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW (see module doc). Each group has a ``name`` for logging."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = wants_weight_decay(name, p)
        hp = {"lr": lr, "weight_decay": weight_decay if decay else 0.0}
        extra = getattr(p, "_optim", None)
        if extra is not None:
            if not isinstance(extra, dict):
                raise TypeError(f"parameter {name}: _optim must be a dict, got {type(extra).__name__}")
            hp.update(extra)
        key = tuple(sorted(hp.items()))
        if key not in groups:
            label = ("decay" if hp["weight_decay"] else "no_decay") + ("" if extra is None else f"+{extra}")
            groups[key] = {"params": [], "names": [], "name": label, **hp}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``_optim`` learning rates are kept relative to the schedule
    (the scheduler multiplies every group's initial lr by the same factor)."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = param_groups(model, lr, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    for g in groups:
        g.pop("names")
    # foreach=False: the single-tensor path gives bit-identical results regardless of grouping,
    # which the resume test relies on; the speed difference is small for the CPU-sized models.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
