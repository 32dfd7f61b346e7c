"""Input validation shared by ops and layers: clear errors that name the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    t: object,
    ndim: int | Sequence[int] | None = None,
    *,
    floating: bool = True,
    shape: Sequence[int | None] | None = None,
    desc: str | None = None,
    allow_none: bool = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a suitable tensor.

    ``shape`` entries of ``None`` match any size; ``desc`` is the human-readable expected shape,
    e.g. ``"(batch, seqlen, dim)"``.
    """
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    want = desc or (str(tuple("*" if s is None else s for s in shape)) if shape is not None else None)
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, dims))} dimensions"
                + (f" {want}" if want else "")
                + f", got shape {tuple(t.shape)}"
            )
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors must live on one device."""
    devs = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devs.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def read_values(check: bool | None, t: torch.Tensor) -> bool:
    """Whether an op may read its inputs' values to validate them: ``check`` when given, else only
    for CPU tensors (on a GPU a read is a host synchronisation and breaks CUDA-graph capture)."""
    if check is not None and not isinstance(check, bool):
        raise TypeError(f"check must be a bool or None, got {type(check).__name__}")
    return check if check is not None else t.device.type == "cpu"


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seqlen: int, values: bool = True) -> None:
    """FlashAttention convention: int32/int64 1-D, starting at 0, non-decreasing, ending at seqlen,
    with batch == 1. ``values=False`` checks the type and shape only (no read of the data)."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D (num_seqs + 1,), got shape {tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch == 1 (sequences packed along seqlen), got batch {batch}")
    if not values:
        return
    c = cu_seqlens.detach().cpu()
    if int(c[0]) != 0 or int(c[-1]) != seqlen:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seqlen={seqlen}, got {c[0].item()}..{c[-1].item()}"
        )
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("cu_seqlens must be sorted (non-decreasing)")


def check_positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
