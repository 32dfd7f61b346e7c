"""``mamba_chunk_scan_combined`` and ``mamba_split_conv1d_scan_combined`` with ``mamba_ssm``'s
argument names and layouts, on any device.

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
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ssmkit._checks import check_tensor
from ssmkit.ops import dispatch
from ssmkit.ops.conv.causal_conv1d import causal_conv1d
from ssmkit.ops.fused.gated_norm import gated_rms_norm
from ssmkit.ops.ssd import ssd

__all__ = ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"]


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


def _split_conv(xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The depthwise causal conv of ``xBC (batch, seqlen, conv_dim)``; with ``seq_idx`` each row's
    sequences are convolved separately (the window does not reach across a boundary)."""
    if seq_idx is None:
        return causal_conv1d(xBC, weight, bias, activation=activation)
    return torch.cat([causal_conv1d(xBC[r:r + 1], weight, bias, activation=activation,
                                    cu_seqlens=_boundaries(seq_idx[r])) for r in range(xBC.shape[0])])


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    state_dtype: torch.dtype | None = None,
):
    """``mamba_ssm``'s fused Mamba-2 layer body: conv1d + SSD + gated RMSNorm + out_proj from
    ``in_proj``'s output, with the memory-saving recompute.

    ``zxbcdt: (batch, seqlen, 2 d_mlp + 2 dim + 2 ngroups dstate + nheads)`` = ``[x0 | z0 | z | x B C
    | dt]`` with ``dim = nheads * headdim`` (``d_mlp``, usually 0: channels of a gated MLP,
    ``silu(x0) * z0``, concatenated before the SSM's output); ``conv1d_weight: (dim + 2 ngroups
    dstate, width)``, ``conv1d_bias`` like its rows; ``dt_bias, A: (nheads,)``; ``D: (nheads,
    headdim)`` or ``(nheads,)`` (then ``headdim`` is required); ``initial_states: (batch, nheads,
    headdim, dstate)``; ``seq_idx: (batch, seqlen)`` int (packed sequences: conv and state reset
    where it changes); ``rmsnorm_weight: (dim,)`` (None: ``y * silu(z)`` instead of the norm,
    which runs in groups of ``dim / ngroups``); ``outproj_weight: (out_dim, d_mlp + dim)``.
    Δ = clamp(softplus(dt + dt_bias), *dt_limit) always.

    Returns ``out (batch, seqlen, out_dim)`` (``d_mlp + dim`` without ``outproj_weight``), and with
    ``return_final_states`` also the final states ``(batch, nheads, headdim, dstate)`` (float32).

    Built from ssmkit's ops (:func:`~ssmkit.ops.causal_conv1d`, :func:`~ssmkit.ops.ssd`,
    :func:`~ssmkit.ops.fused.gated_rms_norm`, ``F.linear``). When autograd records, the conv,
    SSD and norm run under ``torch.utils.checkpoint`` (non-reentrant): only the inputs and the
    normalised output (which out_proj's weight gradient needs) are kept, and the backward
    recomputes the rest. ``state_dtype``: ssmkit keeps states in float32 (float64 for float64
    inputs); None or that dtype.
    """
    check_tensor("zxbcdt", zxbcdt, 3, desc="(batch, seqlen, 2 d_mlp + 2 dim + 2 ngroups dstate + nheads)")
    check_tensor("D", D, (1, 2), desc="(nheads, headdim) or (nheads,)")
    if D.dim() == 1:
        if not isinstance(headdim, int) or headdim <= 0:
            raise ValueError(f"headdim must be a positive int when D is (nheads,), got {headdim!r}")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    if not isinstance(ngroups, int) or ngroups <= 0 or nheads % ngroups:
        raise ValueError(f"ngroups must be a positive int dividing nheads={nheads}, got {ngroups!r}")
    b, l, width = zxbcdt.shape
    dim = nheads * headdim
    check_tensor("conv1d_weight", conv1d_weight, 2, desc="(dim + 2 ngroups dstate, width)")
    conv_dim = conv1d_weight.shape[0]
    dstate = (conv_dim - dim) // (2 * ngroups)
    d_mlp = (width - dim - conv_dim - nheads) // 2
    if dstate <= 0 or conv_dim != dim + 2 * ngroups * dstate or d_mlp < 0 or width != 2 * d_mlp + dim + conv_dim + nheads:
        raise ValueError(f"zxbcdt's last dimension {width} and conv1d_weight's rows {conv_dim} do not fit "
                         f"dim={dim} (nheads={nheads} x headdim={headdim}), ngroups={ngroups}: need conv rows "
                         f"dim + 2 ngroups dstate and zxbcdt width 2 d_mlp + dim + conv rows + nheads")
    check_tensor("conv1d_bias", conv1d_bias, shape=(conv_dim,), desc=f"({conv_dim},)", allow_none=True)
    check_tensor("dt_bias", dt_bias, shape=(nheads,), desc=f"(nheads={nheads},)")
    check_tensor("A", A, shape=(nheads,), desc=f"(nheads={nheads},)")
    check_tensor("rmsnorm_weight", rmsnorm_weight, shape=(dim,), desc=f"(dim={dim},)", allow_none=True)
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias needs outproj_weight")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    sdt = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
    if state_dtype is not None and state_dtype != sdt:
        raise ValueError(f"state_dtype: ssmkit's SSD states are {sdt} for these inputs, got {state_dtype}")
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, shape=(b, l), desc=f"(batch, seqlen) = {(b, l)}", floating=False)

    def body(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states, rmsnorm_weight):
        zx0, z, xBC, dt = zxbcdt.split([2 * d_mlp, dim, conv_dim, nheads], dim=-1)
        xBC = _split_conv(xBC, conv1d_weight, conv1d_bias, activation, seq_idx)
        x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
        z4 = z.reshape(b, l, nheads, headdim)
        y, final = mamba_chunk_scan_combined(
            x.reshape(b, l, nheads, headdim), dt, A, B.reshape(b, l, ngroups, dstate),
            C.reshape(b, l, ngroups, dstate), chunk_size, D=D, z=z4 if rmsnorm_weight is None else None,
            dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit, return_final_states=True)
        y = y.reshape(b, l, dim)
        if rmsnorm_weight is not None:
            y = gated_rms_norm(y, rmsnorm_weight, z, eps=rmsnorm_eps, group_size=dim // ngroups,
                               norm_before_gate=norm_before_gate)
        if d_mlp:
            x0, z0 = zx0.chunk(2, dim=-1)
            y = torch.cat([F.silu(x0) * z0, y], dim=-1)
        return y, final

    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states, rmsnorm_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y, final = checkpoint(body, *args, use_reentrant=False, context_fn=dispatch.checkpoint_contexts)
    else:
        y, final = body(*args)
    out = y if outproj_weight is None else F.linear(y, outproj_weight, outproj_bias)
    return (out, final) if return_final_states else out
