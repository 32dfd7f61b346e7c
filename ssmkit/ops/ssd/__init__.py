"""Mamba-2's structured state space duality (SSD): ``ssd`` and ``ssd_step`` (decoding, T >= 1 tokens).

Forms registered under op name ``"ssd"``: ``reference`` (recurrence), ``quadratic`` (masked
attention view, for tests) and ``chunked`` (the four-stage block algorithm); ``"ssd_step"``:
``reference`` and ``triton`` (one launch; its kernel compiles on first use). ``ssd_state_update`` is the deprecated one-token name of :func:`ssd_step`. See README.md.
"""

from __future__ import annotations

import math
import warnings

import torch

from ssmkit._checks import check_cu_seqlens, check_positive_int, check_same_device, check_tensor, read_values
from ssmkit.ops import dispatch
from ssmkit.ops.ssd import chunked, quadratic, reference, step, step_triton  # noqa: F401  (registers the forms)

__all__ = ["ssd", "ssd_step", "ssd_state_update"]


def _check_dt_limit(dt_limit: object) -> tuple[float, float]:
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise ValueError(f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if not (lo >= 0.0 and hi >= lo):
        raise ValueError(f"dt_limit must satisfy 0 <= min <= max, got {dt_limit!r}")
    return lo, hi


def _check_common(x_desc, x, dt, A, B, C, D, z, dt_bias, lead):
    """Shared shape checks for ``ssd`` (lead = (batch, seqlen)) and the step (lead = (batch,))."""
    nl = len(lead)
    H, P = x.shape[nl], x.shape[nl + 1]
    check_tensor("dt", dt, shape=(*lead, H), desc=f"({', '.join(x_desc[:nl])}, H={H})")
    check_tensor("A", A, shape=(H,), desc=f"(H={H},)")
    check_tensor("B", B, nl + 2, desc=f"({', '.join(x_desc[:nl])}, G, N)")
    if tuple(B.shape[:nl]) != tuple(lead):
        raise ValueError(f"B must have shape ({', '.join(x_desc[:nl])}, G, N) with leading dims {tuple(lead)}, "
                         f"got {tuple(B.shape)}")
    G, N = B.shape[nl], B.shape[nl + 1]
    if G == 0 or H % G:
        raise ValueError(f"the number of groups G={G} (B.shape[{nl}]) must divide the number of heads H={H}")
    check_tensor("C", C, shape=tuple(B.shape), desc=f"like B {tuple(B.shape)}")
    if D is not None:
        check_tensor("D", D, (1, 2), desc=f"(H={H},) or (H={H}, P={P})")
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D must have shape (H={H},) or (H={H}, P={P}), got {tuple(D.shape)}")
    check_tensor("z", z, shape=tuple(x.shape), desc=f"like x {tuple(x.shape)}", allow_none=True)
    check_tensor("dt_bias", dt_bias, shape=(H,), desc=f"(H={H},)", allow_none=True)
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return H, P, G, N


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
):
    """Mamba-2's selective SSM with scalar-per-head A (structured state space duality).

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ,  y_t = h_t C_t + D x_t,  then y * silu(z) if z given,
    where Δ = clamp(softplus?(dt + dt_bias), *dt_limit).

    Shapes: ``x: (batch, seqlen, H, P)``, ``dt: (batch, seqlen, H)``, ``A: (H,)`` (negative for a
    decaying state), ``B, C: (batch, seqlen, G, N)`` with G dividing H (head i reads group
    i // (H/G)), ``D: (H,)`` or ``(H, P)``, ``z`` like ``x``, ``dt_bias: (H,)``,
    ``initial_state: (batch, H, P, N)`` — or ``(num_seqs, H, P, N)`` with ``cu_seqlens``
    (``(num_seqs + 1,)``, batch 1, sequences packed along seqlen, state reset at each start).

    Returns ``y`` shaped like ``x`` (its dtype), and with ``return_final_state`` also the final
    state ``(batch | num_seqs, H, P, N)`` in float32 (float64 for float64 inputs).

    Every argument after ``dt_bias`` is keyword-only (``chunk_size`` too: mamba_ssm's positional
    ``(x, dt, A, B, C, chunk_size, ...)`` is :func:`ssmkit.compat.mamba_chunk_scan_combined`).
    ``check``: also check ``cu_seqlens``' values (None: only for CPU tensors).
    """
    check_tensor("x", x, 4, desc="(batch, seqlen, H, P)")
    b, l, H, P = x.shape
    if l == 0:
        raise ValueError("x must have seqlen >= 1, got 0")
    _check_common(("batch", "seqlen"), x, dt, A, B, C, D, z, dt_bias, (b, l))
    N = B.shape[-1]
    check_positive_int("chunk_size", chunk_size)
    dt_limit = _check_dt_limit(dt_limit)
    check_cu_seqlens(cu_seqlens, b, l, read_values(check, x))
    nstate = b if cu_seqlens is None else cu_seqlens.numel() - 1
    who = "batch" if cu_seqlens is None else "num_seqs"
    check_tensor("initial_state", initial_state, shape=(nstate, H, P, N),
                 desc=f"({who}={nstate}, H={H}, P={P}, N={N})", allow_none=True)
    fn = dispatch.get("ssd", backend, x)
    return fn(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_state,
              return_final_state, cu_seqlens)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    """Deprecated name of :func:`ssd_step` (same arguments, options positional)."""
    warnings.warn("ssd_state_update is deprecated: use ssd_step (same arguments; dt_softplus and "
                  "dt_limit keyword-only)", DeprecationWarning, stacklevel=2)
    return ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)


def _check_state_batch_indices(sbi, batch: int, pool: int, x: torch.Tensor, check: bool | None) -> None:
    """``(batch,)`` int32/int64 on x's device; with readable values: each < pool, the
    non-negative ones distinct (two rows writing one pool row would race)."""
    if not isinstance(sbi, torch.Tensor):
        raise TypeError(f"state_batch_indices must be a torch.Tensor, got {type(sbi).__name__}")
    if sbi.dtype not in (torch.int32, torch.int64) or tuple(sbi.shape) != (batch,):
        raise ValueError(f"state_batch_indices must be an int32/int64 tensor of shape (batch={batch},), "
                         f"got {sbi.dtype} {tuple(sbi.shape)}")
    check_same_device(x=x, state_batch_indices=sbi)
    if read_values(check, x):
        live = sbi[sbi >= 0]
        if live.numel() and int(live.max()) >= pool:
            raise ValueError(f"state_batch_indices must be < the state pool's size {pool}, got {int(live.max())}")
        if live.unique().numel() != live.numel():
            raise ValueError("state_batch_indices must not repeat a pool row (negative: padding)")


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    state_batch_indices: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """SSD decoding: advance ``state (batch, H, P, N)`` in place by T >= 1 tokens, return ``y``.

    One token: ``x: (batch, H, P)``, ``dt: (batch, H)``, ``B, C: (batch, G, N)``; T tokens: a
    ``T`` axis after batch on each (``x: (batch, T, H, P)`` ...). ``A: (H,)``, ``D: (H,)`` or
    ``(H, P)``, ``z`` like ``x``, ``dt_bias: (H,)``. Returns ``y`` shaped like ``x`` in its dtype:
    :func:`ssd` continued from ``state``. Options keyword-only.

    ``state_batch_indices (batch,)`` (int): serve the batch from a pool of states ``state (pool,
    H, P, N)``: row ``b`` reads and writes pool row ``state_batch_indices[b]``; a negative index
    marks a padding row, whose output is zero and which touches no state (as ``mamba_ssm``'s
    ``selective_state_update``). Pool rows must not repeat. ``check``: also check the indices'
    values (None: only for CPU tensors).
    """
    check_tensor("x", x, (3, 4), desc="(batch, H, P) or (batch, T, H, P)")
    single = x.dim() == 3
    lead = (x.shape[0],) if single else tuple(x.shape[:2])
    _check_common(("batch",) if single else ("batch", "T"), x, dt, A, B, C, D, z, dt_bias, lead)
    b, H, P = x.shape[0], x.shape[-2], x.shape[-1]
    N = B.shape[-1]
    if state_batch_indices is None:
        check_tensor("state", state, shape=(b, H, P, N), desc=f"(batch={b}, H={H}, P={P}, N={N})")
    else:
        check_tensor("state", state, shape=(None, H, P, N), desc=f"(pool, H={H}, P={P}, N={N})")
        _check_state_batch_indices(state_batch_indices, b, state.shape[0], x, check)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    dt_limit = _check_dt_limit(dt_limit)
    if single:
        x, dt, B, C = x.unsqueeze(1), dt.unsqueeze(1), B.unsqueeze(1), C.unsqueeze(1)
        z = None if z is None else z.unsqueeze(1)
    fn = dispatch.get("ssd_step", backend, x)
    y = fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, state_batch_indices)
    return y.squeeze(1) if single else y
