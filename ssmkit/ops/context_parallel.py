"""Context parallelism: one sequence sharded along ``seqlen`` over the ranks of a process group.

Rank ``r`` of a group of ``R`` holds the contiguous shard ``[start_r, end_r)`` of every tensor's
seqlen axis (shards in rank order, lengths may differ). Each op here has the signature of its
single-process form plus a keyword-only ``group`` (a ``torch.distributed`` ``ProcessGroup`` or a
1-D ``DeviceMesh``, e.g. ``mesh["cp"]``) and returns this rank's shard of the single-process
result; with a group of one rank it *is* the single-process op (no collective, no extra work).

Linear recurrences ``h_t = M_t h_{t-1} + b_t`` (see docs/context-parallel.md):

1. every rank scans its shard from a zero state: local outputs, the local final state ``h_r``
   and the shard's transition ``T_r = M_{end-1} ... M_start``;
2. one all-gather of ``(h_r, T_r)``; rank ``r`` folds the ranks before it,
   ``H <- T_j H + h_j`` for ``j < r``, into the state carried in ``H_r``;
3. each rank adds ``H_r``'s contribution to its outputs.

``T_r`` is ``exp(A ΣΔ)`` per (channel, state) for :func:`selective_scan`, one scalar per head for
:func:`ssd` and a ``K x K`` matrix per head for :func:`delta_rule` (obtained, with the
correction's operands, by one scan over an augmented state: see that function). The backward of
the exchange runs the fold's backward on every rank and sums the per-rank state gradients over
the group (reduce-scatter; all-reduce on gloo), so gradients flow back across ranks.

:func:`causal_conv1d` takes the ``width - 1`` inputs before its shard from the ranks before it
(the same fold over windows). ``cu_seqlens`` is the *whole* sequence's (the same tensor on every
rank, batch 1): a packed sequence may cross any shard boundary; states carry only within one.
The sequence starts from a zero state on rank 0 (no ``initial_state``); with
``return_final_state`` each rank returns the state at the end of its shard (rank ``R - 1``'s is
the sequence's final state; with ``cu_seqlens``, one row per sequence piece on the shard).

Every rank must call each op, in the same order (they contain collectives).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssmkit.ops.conv.causal_conv1d import causal_conv1d as _causal_conv1d
from ssmkit.ops.delta_rule import delta_rule as _delta_rule
from ssmkit.ops.selective_scan import selective_scan as _selective_scan
from ssmkit.ops.selective_scan._common import prepare_dt
from ssmkit.ops.ssd import ssd as _ssd
from ssmkit.ops.ssd._common import process_dt
from ssmkit.ops.ssd.reference import heads_from_groups

__all__ = [
    "resolve_group", "group_size", "group_rank", "shard_bounds", "shard",
    "exchange", "all_gather_seq", "all_gather_tensor", "all_reduce_sum",
    "selective_scan", "ssd", "delta_rule", "causal_conv1d",
]


# -- groups and shards --------------------------------------------------------------------------
def resolve_group(group):
    """A ``ProcessGroup`` from a ``ProcessGroup`` or a 1-D ``DeviceMesh`` (None stays None)."""
    if group is None:
        return None
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group: a DeviceMesh must be 1-D (e.g. mesh['cp']), got {group.ndim} dims")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    return group


def group_size(group) -> int:
    """Ranks in ``group`` (1 for None)."""
    group = resolve_group(group)
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 for None)."""
    group = resolve_group(group)
    return 0 if group is None else dist.get_rank(group)


def shard_bounds(seqlen: int, group, device=None) -> list[int]:
    """``[start_0, start_1, ..., start_{R-1}, total]`` from each rank's local ``seqlen`` (one
    all-gather of an int; every rank calls it)."""
    group = resolve_group(group)
    if group_size(group) == 1:
        return [0, seqlen]
    t = torch.tensor([seqlen], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [0, *itertools.accumulate(int(o) for o in out)]


def shard(t: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous piece of ``t`` along ``dim`` (even split; the first
    ``size % world`` ranks take one more). A view."""
    n = t.shape[dim]
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return t.narrow(dim, start, base + (rank < extra))


@torch.no_grad()
def all_gather_tensor(t: torch.Tensor, *, group) -> torch.Tensor:
    """``(R, *t.shape)``: every rank's ``t`` (same shape on all ranks), not differentiable."""
    group = resolve_group(group)
    if group_size(group) == 1:
        return t[None]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor, *, group) -> torch.Tensor:
    """The sum of ``t`` over the group (a new tensor; not differentiable)."""
    t = t.detach().clone()
    group = resolve_group(group)
    if group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """States, decays and corrections: float64 for float64 inputs, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(t: torch.Tensor):
    """States and their corrections stay in their own precision (float32 / float64) under
    autocast, as inside the scans."""
    return torch.autocast(t.device.type, enabled=False)


# -- the exchange -------------------------------------------------------------------------------
def _reduce_scatter_rows(rows: torch.Tensor, group, rank: int) -> torch.Tensor:
    """``rows (R, n)`` on every rank -> the sum over ranks of row ``rank``."""
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
        dist.all_reduce(rows, group=group)
        return rows[rank]
    out = rows.new_empty(rows.shape[1])
    dist.reduce_scatter_tensor(out, rows.reshape(-1).contiguous(), group=group)
    return out


class _Exchange(torch.autograd.Function):
    """``fold(rank, *stacked)`` where ``stacked[i]`` is ``(R, *local[i].shape)``, every rank's
    ``local[i]``. Backward: the fold's backward on this rank gives gradients for every rank's
    inputs; summing them over the group gives each rank the gradient of its own inputs."""

    @staticmethod
    def forward(ctx, group, fold, *local):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dtype = local[0].dtype
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in local])
        bufs = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(bufs, flat, group=group)
        rows = torch.stack(bufs)  # (R, n)
        parts = [p.reshape(world, *t.shape).to(t.dtype)
                 for p, t in zip(rows.split([t.numel() for t in local], dim=1), local)]
        ctx.group, ctx.fold, ctx.rank, ctx.world, ctx.dtype = group, fold, rank, world, dtype
        ctx.save_for_backward(*parts)
        with torch.no_grad(), _no_autocast(flat):
            return fold(rank, *parts)

    @staticmethod
    def backward(ctx, grad):
        parts = [p.detach().requires_grad_(p.is_floating_point()) for p in ctx.saved_tensors]
        with torch.enable_grad(), _no_autocast(parts[0]):
            out = ctx.fold(ctx.rank, *parts)
        grads = [None] * len(parts)
        if out.requires_grad:
            grads = torch.autograd.grad(out, [p for p in parts if p.requires_grad], grad, allow_unused=True)
            it = iter(grads)
            grads = [next(it) if p.requires_grad else None for p in parts]
        rows = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(ctx.world, -1).to(ctx.dtype)
                          for p, g in zip(parts, grads)], dim=1)
        mine = _reduce_scatter_rows(rows, ctx.group, ctx.rank)
        out_grads = [m.reshape(p.shape[1:]).to(p.dtype) if need else None
                     for m, p, need in zip(mine.split([p[0].numel() for p in parts]), parts,
                                           ctx.needs_input_grad[2:])]
        return (None, None, *out_grads)


def exchange(group, fold, *local: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather of ``local`` tensors (same shapes on every rank) followed by
    ``fold(rank, *stacked) -> tensor`` on each rank. ``fold`` must be plain autograd-able torch
    code: the backward reruns it to get the gradients of every rank's inputs."""
    return _Exchange.apply(resolve_group(group), fold, *local)


def _fold_affine(rank, h, T):
    """``H <- T_j H + h_j`` over ``j < rank`` (elementwise ``T``, broadcast)."""
    out = torch.zeros_like(h[0])
    for j in range(rank):
        out = T[j] * out + h[j]
    return out


def _fold_matrix(rank, h, P):
    """``H <- P_j @ H + h_j`` over ``j < rank`` (``P_j: (..., K, K)``, ``h_j: (..., K, V)``)."""
    out = torch.zeros_like(h[0])
    for j in range(rank):
        out = P[j] @ out + h[j]
    return out


def all_gather_seq(t: torch.Tensor, *, group, bounds: list[int], dim: int = 1, causal: bool = False) -> torch.Tensor:
    """The whole sequence from every rank's shard ``t`` (differentiable; backward: every rank
    gets the summed gradient of its own shard). ``bounds`` from :func:`shard_bounds`.
    ``causal``: only up to the end of this rank's shard (what causal attention reads)."""
    group = resolve_group(group)
    world = group_size(group)
    if world == 1:
        return t
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    pad = max(lens) - t.shape[dim]
    if pad:
        t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim=dim)

    def fold(rank, stacked):
        upto = lens[: rank + 1] if causal else lens
        return torch.cat([stacked[j].narrow(dim, 0, n) for j, n in enumerate(upto)], dim=dim)

    return exchange(group, fold, t)


# -- packed sequences ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Packed:
    """This shard's view of the whole sequence's ``cu_seqlens``."""

    cu: torch.Tensor  # local cu_seqlens (int64), boundaries inside the shard
    continues: bool  # the first piece belongs to a sequence begun on an earlier rank
    carries: bool  # the state passed on depends on the state received (one piece, continued)
    seq_start: int  # global start of the sequence the shard's first position belongs to
    start: int  # global start of the shard

    @property
    def pieces(self) -> int:
        return self.cu.numel() - 1

    def first_end(self) -> int:
        return int(self.cu[1])

    def last_start(self) -> int:
        return int(self.cu[-2])


def _packed(cu_seqlens, seqlen: int, batch: int, group, device) -> _Packed | None:
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor (num_seqs + 1,) of the whole sequence's boundaries")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch 1 (sequences packed along seqlen), got batch {batch}")
    bounds = shard_bounds(seqlen, group, device)
    rank = group_rank(group)
    start, end = bounds[rank], bounds[rank + 1]
    c = [int(v) for v in cu_seqlens.tolist()]
    if c[0] != 0 or c[-1] != bounds[-1] or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the whole length {bounds[-1]} (all shards), got {c}")
    inner = [v - start for v in c if start < v < end]
    local = torch.tensor([0, *inner, end - start], dtype=torch.int64, device=device)
    continues = start not in c
    return _Packed(local, continues, continues and not inner, max(v for v in c if v <= start), start)


def _initial_rows(first: torch.Tensor, pk: _Packed | None) -> torch.Tensor:
    """``first`` (batch, ...) as the initial state; with packed sequences the first piece's row
    (zero unless it continues) and zero rows for the others."""
    if pk is None:
        return first
    first = first * float(pk.continues)
    return torch.cat([first, first.new_zeros(pk.pieces - 1, *first.shape[1:])]) if pk.pieces > 1 else first


# -- the ops ------------------------------------------------------------------------------------
def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, *, group, dt_softplus=False,
                   return_final_state=False, cu_seqlens=None, backend="auto"):
    """:func:`ssmkit.ops.selective_scan` on this rank's shard. Shapes as there, seqlen local.

    The scan runs twice: from zero (the local final state for the exchange) and from the state
    carried in. A correction in closed form would need ``C_t · (exp(A Σ_{s<=t} Δ_s) ⊙ H)``, a
    ``(batch, seqlen, dim, N)`` term as costly as the scan itself, so the rerun (any backend,
    D and z included) is the simpler equal-cost choice.
    """
    pg = resolve_group(group)
    kw = dict(dt_softplus=dt_softplus, cu_seqlens=cu_seqlens, backend=backend)
    if group_size(pg) == 1:
        return _selective_scan(x, dt, A, B, C, D, z, dt_bias, return_final_state=return_final_state, **kw)
    pk = _packed(cu_seqlens, x.shape[1], x.shape[0], pg, x.device)
    kw["cu_seqlens"] = None if pk is None else pk.cu
    _, h = _selective_scan(x, dt, A, B, C, None, None, dt_bias, return_final_state=True, **kw)
    h = h.to(_state_dtype(x))
    delta = prepare_dt(dt, dt_bias, dt_softplus, h.dtype)
    if pk is not None:
        h, delta = h[-1:], delta[:, pk.last_start():]
    decay = torch.exp(delta.sum(1)[:, :, None] * A.to(h.dtype))  # (batch, dim, N)
    if pk is not None and not pk.carries:
        decay = torch.zeros_like(decay)
    carried = exchange(pg, _fold_affine, h, decay)
    return _selective_scan(x, dt, A, B, C, D, z, dt_bias, initial_state=_initial_rows(carried, pk),
                           return_final_state=return_final_state, **kw)


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, *, group, chunk_size=64, dt_softplus=False,
        dt_limit=(0.0, math.inf), return_final_state=False, cu_seqlens=None, backend="auto"):
    """:func:`ssmkit.ops.ssd` on this rank's shard. Shapes as there, seqlen local.

    One scan from zero, then the carried state's contribution in closed form (A is a scalar per
    head): ``y_t += exp(Σ_{s<=t} Δ_s A) · (H C_t)``, a ``(batch, seqlen, H, P)`` term.
    """
    pg = resolve_group(group)
    kw = dict(chunk_size=chunk_size, dt_softplus=dt_softplus, dt_limit=dt_limit, backend=backend)
    if group_size(pg) == 1:
        return _ssd(x, dt, A, B, C, D, z, dt_bias, return_final_state=return_final_state,
                    cu_seqlens=cu_seqlens, **kw)
    b, L, H, _ = x.shape
    pk = _packed(cu_seqlens, L, b, pg, x.device)
    y, h = _ssd(x, dt, A, B, C, None, None, dt_bias, return_final_state=True,
                cu_seqlens=None if pk is None else pk.cu, **kw)
    cdt = _state_dtype(x)
    h = h.to(cdt)
    a = process_dt(dt, dt_bias, dt_softplus, tuple(dt_limit), cdt) * A.to(cdt)  # (b, L, H)
    f = L if pk is None else pk.first_end()
    a_last = a if pk is None else a[:, pk.last_start():]
    decay = torch.exp(a_last.sum(1))[:, :, None, None]  # (b, H, 1, 1)
    if pk is not None and not pk.carries:
        decay = torch.zeros_like(decay)
    carried = exchange(pg, _fold_affine, h if pk is None else h[-1:], decay)
    if pk is not None:
        carried = carried * float(pk.continues)
    cum = torch.exp(torch.cumsum(a[:, :f], 1))  # (b, f, H)
    Ch = heads_from_groups(C[:, :f].to(cdt), H)
    with _no_autocast(x):
        corr = cum[..., None] * torch.einsum("blhn,bhpn->blhp", Ch, carried)
    yc = y.to(cdt)
    yc = yc + corr if f == L else torch.cat([yc[:, :f] + corr, yc[:, f:]], 1)
    if D is not None:
        Dc = D.to(cdt)
        yc = yc + x.to(cdt) * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        yc = yc * F.silu(z.to(cdt))
    yc = yc.to(x.dtype)
    if not return_final_state:
        return yc
    final = h[: 1 if pk is not None else b] + cum[:, -1, :, None, None] * carried
    return yc, final if pk is None else torch.cat([final, h[1:]])


def delta_rule(q, k, v, *, beta, g=None, group, scale=None, use_qk_l2norm=False, chunk_size=64,
               return_final_state=False, cu_seqlens=None, backend="auto"):
    """:func:`ssmkit.ops.delta_rule` (plain or gated) on this rank's shard; seqlen local.

    A shard maps the state carried in, ``h = Sᵀ (K x V)``, to ``P h + h_loc`` with ``P`` the
    product of the shard's ``α_t (I - β_t k_t k_tᵀ)``: a K x K matrix per head. One scan of an
    augmented state ``[P_t | h_t]`` (initial ``[I | 0]``, values ``[0 | v]``, so V + K columns)
    gives ``P``, ``h_loc`` and, as its outputs, ``u_t = P_tᵀ q_t`` next to the local ``o_t``;
    after the exchange of ``(h_loc, P)`` the output is ``o_t + Hᵀ u_t``, one product per token.
    Cost: one scan of (K + V)/V the width, against two scans (local state, then a rerun from
    the carried state) plus the transition for rerunning — exchanging ``P`` wins.
    """
    pg = resolve_group(group)
    kw = dict(beta=beta, g=g, scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, backend=backend)
    if group_size(pg) == 1:
        return _delta_rule(q, k, v, return_final_state=return_final_state, cu_seqlens=cu_seqlens, **kw)
    b, L, H, K = q.shape
    V = v.shape[-1]
    pk = _packed(cu_seqlens, L, b, pg, q.device)
    cdt = _state_dtype(q, k, v)
    eye = torch.eye(K, dtype=cdt, device=q.device).expand(b, H, K, K)
    init = torch.cat([eye, eye.new_zeros(b, H, K, V)], -1)
    if pk is not None and pk.pieces > 1:  # only the first piece can continue a sequence
        init = torch.cat([init, init.new_zeros(pk.pieces - 1, H, K, K + V)])
    va = torch.cat([v.new_zeros(b, L, H, K), v], -1)
    o2, h2 = _delta_rule(q, k, va, initial_state=init, return_final_state=True,
                         cu_seqlens=None if pk is None else pk.cu, **kw)
    u, o = o2[..., :K], o2[..., K:]
    h2 = h2.to(cdt)  # (autocast may hand back a lower-precision state)
    P, h = h2[..., :K], h2[..., K:]
    if pk is not None:
        P_last = P[-1:] if pk.carries else torch.zeros_like(P[-1:])
        carried = exchange(pg, _fold_matrix, h[-1:], P_last) * float(pk.continues)
    else:
        carried = exchange(pg, _fold_matrix, h, P)
    with _no_autocast(q):
        o = (o.to(cdt) + torch.einsum("blhk,bhkv->blhv", u.to(cdt), carried)).to(q.dtype)
        if not return_final_state:
            return o
        final = P[: 1 if pk is not None else b] @ carried + h[: 1 if pk is not None else b]
    return o, final if pk is None else torch.cat([final, h[1:]])


def _fold_window(rank, tails, counts):
    """The last ``W`` inputs before shard ``rank``: ``window <- last W of [window, tail_j]``."""
    W = tails.shape[2]
    win = torch.zeros_like(tails[0])
    for j in range(rank):
        n = int(counts[j, 0])
        if n:
            win = torch.cat([win, tails[j][:, W - n:]], 1)[:, -W:]
    return win


def causal_conv1d(x, weight, bias=None, activation=None, *, group, return_final_state=False,
                  cu_seqlens=None, backend="auto"):
    """:func:`ssmkit.ops.causal_conv1d` on this rank's shard: the ``width - 1`` inputs before the
    shard come from the ranks before it (more than one when shards are shorter than that)."""
    pg = resolve_group(group)
    kw = dict(activation=activation, return_final_state=return_final_state, backend=backend)
    W = weight.shape[-1] - 1
    if group_size(pg) == 1 or W == 0:
        return _causal_conv1d(x, weight, bias, cu_seqlens=cu_seqlens, **kw)
    b, L, dim = x.shape
    pk = _packed(cu_seqlens, L, b, pg, x.device)
    n = min(L, W)
    tail = torch.cat([x.new_zeros(b, W - n, dim), x[:, L - n:]], 1)
    window = exchange(pg, _fold_window, tail, x.new_full((1,), n))  # (b, W, dim)
    if pk is not None:
        # inputs before the start of the shard's first sequence are not its context
        pos = pk.start - W + torch.arange(W, device=x.device)
        keep = (pos >= pk.seq_start) & pk.continues
        window = window * keep.to(window.dtype)[None, :, None]
    init = _initial_rows(window.transpose(1, 2), pk)
    return _causal_conv1d(x, weight, bias, initial_state=init, cu_seqlens=None if pk is None else pk.cu, **kw)
