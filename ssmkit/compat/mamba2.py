"""``mamba_chunk_scan_combined`` with ``mamba_ssm``'s argument names and layouts, on any device.

A thin adapter over :func:`ssmkit.ops.ssd`: same tensors (``x: (batch, seqlen, nheads, headdim)``,
``dt: (batch, seqlen, nheads)``, ``A: (nheads,)``, ``B, C: (batch, seqlen, ngroups, dstate)``,
``D: (nheads, headdim)`` or ``(nheads,)``, ``initial_states: (batch, nheads, headdim, dstate)``),
same return convention. ``seq_idx: (batch, seqlen)`` (int; the state resets wherever it changes)
and ``cu_seqlens`` (batch 1) both mark packed sequences; ``initial_states`` feeds the first
sequence of each row, as in ``mamba_ssm``. ``return_varlen_states`` returns each sequence's final
state ``(num_seqs, nheads, headdim, dstate)``.
"""

from __future__ import annotations

import math

import torch

from ssmkit._checks import check_tensor
from ssmkit.ops.ssd import ssd

__all__ = ["mamba_chunk_scan_combined"]


def _boundaries(seq_idx_row: torch.Tensor) -> torch.Tensor:
    """``(seqlen,)`` sequence ids -> cu_seqlens ``(num_seqs + 1,)`` (a new sequence where it changes)."""
    L = seq_idx_row.numel()
    starts = torch.nonzero(seq_idx_row[1:] != seq_idx_row[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=torch.long, device=seq_idx_row.device)
    end = torch.full((1,), L, dtype=torch.long, device=seq_idx_row.device)
    return torch.cat([zero, starts.long(), end])


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Returns ``out`` (like x); ``(out, final_states)`` with ``return_final_states``; with
    ``return_varlen_states`` the per-sequence states are appended last."""
    check_tensor("x", x, 4, desc="(batch, seqlen, nheads, headdim)")
    b, l = x.shape[:2]
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens")
    kw = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    varlen_states = None
    if cu_seqlens is not None:
        nseq = cu_seqlens.numel() - 1
        init = None
        if initial_states is not None:
            check_tensor("initial_states", initial_states, 4, desc="(batch, nheads, headdim, dstate)")
            init = initial_states.new_zeros(nseq, *initial_states.shape[1:]).float()
            init[0] = initial_states[0]
        out, varlen_states = ssd(x, dt, A, B, C, initial_state=init, return_final_state=True,
                                 cu_seqlens=cu_seqlens, **kw)
        final = varlen_states[-1:]
    elif seq_idx is not None:
        check_tensor("seq_idx", seq_idx, shape=(b, l), desc=f"(batch, seqlen) = {(b, l)}", floating=False)
        outs, finals = [], []
        for r in range(b):
            cu = _boundaries(seq_idx[r])
            init = None
            if initial_states is not None:
                check_tensor("initial_states", initial_states, 4, desc="(batch, nheads, headdim, dstate)")
                init = initial_states.new_zeros(cu.numel() - 1, *initial_states.shape[1:]).float()
                init[0] = initial_states[r]
            y_r, st_r = ssd(x[r : r + 1], dt[r : r + 1], A, B[r : r + 1], C[r : r + 1],
                            initial_state=init, return_final_state=True, cu_seqlens=cu,
                            **{**kw, "z": None if z is None else z[r : r + 1]})
            outs.append(y_r)
            finals.append(st_r[-1:])
        out, final = torch.cat(outs), torch.cat(finals)
    else:
        out, final = ssd(x, dt, A, B, C, initial_state=initial_states, return_final_state=True, **kw)
    result = (out,)
    if return_final_states:
        result += (final,)
    if return_varlen_states:
        result += (varlen_states,)
    return result[0] if len(result) == 1 else result
