"""Context parallelism for :class:`~ssmkit.LanguageModel`: every rank of a group holds a contiguous
shard of the sequence, in rank order (see :mod:`ssmkit.ops.context_parallel` and
docs/context-parallel.md).

* :func:`set_context_parallel` gives the group to every mixer that has a context-parallel form:
  Mamba (S6), Mamba-2, DeltaNet / Gated DeltaNet (state exchange) and attention (all-gathered keys
  and values), also inside Falcon-H1's parallel hybrid. Embeddings, norms, MLPs, MoE and the LM
  head work per position and need nothing.
* :func:`shifted_labels` moves the labels one position left across the shard boundaries: a
  shard's last position predicts the next shard's first label.
* :func:`loss_share`: each rank's loss is its share ``sum / (scored labels of the whole
  sequence)``, so the shares add up to the whole sequence's mean and the sum of the ranks'
  gradients is the single-process gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ssmkit.layers.attention import Attention
from ssmkit.layers.delta_net import DeltaNet
from ssmkit.layers.mamba import Mamba
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.ops import context_parallel as cp

__all__ = ["set_context_parallel", "active_group", "shifted_labels", "loss_share"]

# Mixers with a context-parallel form (subclasses included).
CONTEXT_PARALLEL_MIXERS = (Mamba, Mamba2, DeltaNet, Attention)
# Layer letters whose mixers work per position (nothing to exchange).
_POSITIONWISE = ("F",)


def set_context_parallel(model: nn.Module, group) -> None:
    """Shard ``model``'s sequence axis over ``group`` (a ProcessGroup or 1-D DeviceMesh; None
    turns it off). Raises for layers without a context-parallel form, before changing anything."""
    cp.resolve_group(group)  # type check
    if group is not None:
        config = model.config
        if config.shared_cfg:
            raise ValueError("context parallelism does not support shared blocks (ModelConfig.shared_cfg)")
        for i, blk in enumerate(model.backbone.layers):
            if blk.letter in _POSITIONWISE:
                continue
            mixers = [m for m in blk.mixer.modules() if isinstance(m, CONTEXT_PARALLEL_MIXERS)]
            if not mixers or (isinstance(blk.mixer, Mamba) and blk.mixer.inner_name != "s6"):
                raise ValueError(f"layer {i} ({type(blk.mixer).__name__}, letter {blk.letter!r}) has no "
                                 "context-parallel form; supported: Mamba, Mamba-2, (Gated) DeltaNet, attention")
    for m in model.modules():
        if isinstance(m, CONTEXT_PARALLEL_MIXERS):
            m.context_parallel = group
    model.context_parallel = group


def active_group(group):
    """``group``, or None when it is None or has one rank (then the model runs its plain path)."""
    return None if group is None or cp.group_size(group) == 1 else group


def shifted_labels(labels: torch.Tensor, group) -> torch.Tensor:
    """``labels (batch, seqlen)`` aligned with this rank's input ids -> the target of each
    position: label ``t + 1``, across the boundary to the next rank; -100 (unscored) after the
    sequence's last position."""
    firsts = cp.all_gather_tensor(labels[:, :1], group=group)  # (R, batch, 1)
    r, world = cp.group_rank(group), cp.group_size(group)
    nxt = firsts[r + 1] if r + 1 < world else torch.full_like(labels[:, :1], -100)
    return torch.cat([labels[:, 1:], nxt], 1)


def loss_share(mean_fn, x: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """This rank's share of the whole sequence's mean loss: ``mean_fn()`` (the mean over this
    rank's scored ``targets``, != -100) times the rank's fraction of the scored labels. A rank
    with none returns ``0 * x.sum()``: its backward must still reach every layer (the layers'
    backward exchanges states with the other ranks)."""
    n_local = (targets != -100).sum()
    n_total = cp.all_reduce_sum(n_local, group=group)
    if int(n_local) == 0:
        return x.float().sum() * 0.0
    mean = mean_fn()
    return mean * (n_local.to(mean.dtype) / n_total.clamp_min(1).to(mean.dtype))
