"""Data parallelism through ``torch.distributed``: DDP, or FSDP for models too big for one GPU, composed
with context parallelism (each sequence sharded over ``context_parallel`` ranks) on a 2-D mesh.

Launch with ``torchrun --nproc_per_node=N -m ssmkit train ...`` (multi-node: add ``--nnodes``,
``--node_rank`` and ``--rdzv_endpoint``): torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, and :func:`init` reads them. The backend is NCCL on CUDA and gloo on the CPU.

Every rank draws the same *global* batch from the same seeded generator and keeps its own slice,
so N processes see exactly the rows one process with the N-times batch would see; the loss is
normalised by the global number of scored tokens, so the averaged gradient equals the big-batch
gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass
class DistInfo:
    """This process's place in the process group; ``device`` is where the group's collectives run
    (``cuda:LOCAL_RANK`` under NCCL, which only reduces CUDA tensors; the model's device under gloo)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _group_device(backend: str, local_rank: int, device: torch.device | None) -> torch.device:
    if "nccl" in backend or (device is not None and device.type == "cuda"):
        return torch.device("cuda", local_rank)
    return device if device is not None else torch.device("cpu")


def init(backend: str | None = None, device: torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op without them).

    Under NCCL the group is bound to ``cuda:LOCAL_RANK`` (its barriers and collectives run there).
    NCCL's own settings (``NCCL_*``, ``TORCH_SYMM_MEM_*`` in the environment) are left as they are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        dev = _group_device(dist.get_backend(), local_rank, device)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device=dev)
    if world <= 1:
        return DistInfo(device=device if device is not None else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    if backend is None:
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
    dev = _group_device(backend, local_rank, device)
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10),
                            **kw)
    return DistInfo(rank, world, local_rank, initialized_here=True, device=dev)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        # Wait for every rank first: a rank that tears its connections down while another still
        # finishes a collective (FSDP's last gathers) can abort that rank's gloo threads.
        _barrier(info)
        dist.destroy_process_group()


def context_mesh(info: DistInfo, context_parallel: int, device: torch.device):
    """The 2-D ``DeviceMesh`` ``("dp", "cp")`` of ``world / context_parallel`` data-parallel replicas
    of ``context_parallel`` ranks each (rank = dp_rank * context_parallel + cp_rank: a sequence's
    shards sit on neighbouring ranks, on one host where possible); None for 1.

    The ``cp`` dimension shards each sequence; gradients are reduced over every rank (DDP / FSDP
    over the whole world), since a model's gradient is the sum over all shards of all rows."""
    if context_parallel == 1:
        return None
    if info.world_size % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} must divide the world size {info.world_size}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (info.world_size // context_parallel, context_parallel),
                            mesh_dim_names=("dp", "cp"))


# Methods besides ``forward`` through which a model may call its blocks.
FORWARD_METHODS = ("forward_residual",)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp", device: torch.device | None = None) -> nn.Module:
    """Wrap ``model`` for data parallel training: ``"ddp"`` or ``"fsdp"`` (sharded parameters,
    gradients and optimizer state; use for models that do not fit one device)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        # FSDP2 (per-parameter sharding): works on CPU with gloo as well as on GPUs with NCCL.
        # Each block of a ModuleList (the model's layers) is its own shard group, then the root.
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # Only the outermost lists: a block's own lists (MoE experts) belong to the block's shard.
        sharded: list[str] = []
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ModuleList) and not any(name.startswith(s + ".") for s in sharded):
                sharded.append(name)
                for block in m:
                    if any(True for _ in block.parameters()):
                        fully_shard(block)
                        # Blocks that the model calls through another method than forward
                        # (LanguageModel's forward_residual) gather their shards there too.
                        for method in FORWARD_METHODS:
                            if callable(getattr(block, method, None)):
                                register_fsdp_forward_method(block, method)
        fully_shard(model)
        return model
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module):
    """Skip the gradient all-reduce for an accumulation micro-batch (DDP and FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def check_device(t: torch.Tensor, info: DistInfo) -> None:
    """Refuse a tensor that is not where the process group's collectives run (a CPU tensor handed
    to NCCL fails deep inside it, or under gloo silently costs a copy per step)."""
    if t.device != info.device:
        raise RuntimeError(f"a collective got a tensor on {t.device}, but this process group's collectives run "
                           f"on {info.device}: create it with device={str(info.device)!r}")


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place (returns ``t`` itself in a single process); ``t`` must be
    on ``info.device``."""
    if info.enabled:
        check_device(t, info)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        _barrier(info)


def _barrier(info: DistInfo) -> None:
    # NCCL's barrier is an all-reduce on a device: name it (a group initialised elsewhere may not
    # be bound to one, and NCCL would guess from the rank).
    if info.device.type == "cuda" and "nccl" in dist.get_backend():
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)
