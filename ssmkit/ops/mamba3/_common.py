"""Pieces shared by every Mamba-3 form: the per-token preprocessing (biases, rotary angles,
trapezoid weights, MIMO up-projection), the D / z / MIMO-out epilogue, packed sequences and the
final state.

Each form (reference, chunked) only implements the bare map from the prepared per-token tensors
and the initial state to the per-rank outputs and the final SSM state; :func:`make_form` wraps it
into the full op signature, so the forms cannot drift apart in how they treat biases, angles,
``D``, ``z``, the MIMO projections, ``cu_seqlens`` or the carried (k, v) of the state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssmkit.ops.ssd._common import compute_dtype, pad_packed, unpad_packed

TWO_PI = 2.0 * math.pi


class Mamba3Carry(NamedTuple):
    """The decode state of a Mamba-3 layer, per sequence (float32, float64 for float64 inputs):

    * ``angle: (batch, H, S)`` accumulated rotary angles, kept in [0, 2π);
    * ``ssm: (batch, H, P, N)`` the state h;
    * ``k: (batch, R, H, N)`` the previous token's rotated, biased B (one per rank; R = 1 for SISO);
    * ``v: (batch, H, P)`` the previous token's x (before the MIMO up-projection).
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class Prepared(NamedTuple):
    """Per-token tensors of one call, in the compute dtype. ``q, k: (b, l, R, H, N)`` rotated
    (k not yet weighted), ``v: (b, l, R, H, P)`` (x up-projected per rank), ``dt, dA, lam: (b, l, H)``
    (Δ, log decay A·Δ, λ = sigmoid(trap)), ``theta: (b, l, H, S)`` cumulative angles."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dt: torch.Tensor
    dA: torch.Tensor
    lam: torch.Tensor
    theta: torch.Tensor


def rotation(theta: torch.Tensor):
    """``exp(iθ)``: the rotations of :func:`rotate_` as complex numbers (computed once for q and k).
    While ``torch.compile`` traces, the pair ``(cos θ, sin θ)`` instead: its inductor backend
    differentiates products of complex tensors with slices of a real one wrongly (torch 2.13:
    gradients of θ off by O(1) when S < N/2), real arithmetic it gets right."""
    if torch.compiler.is_compiling():
        return torch.cos(theta), torch.sin(theta)
    return torch.complex(torch.cos(theta), torch.sin(theta))


def rotate_(t: torch.Tensor, rot, pairs: str) -> torch.Tensor:
    """Rotate pairs of the last axis of ``t (..., N)`` in place (``t`` must be a tensor of one's
    own) by the angles of ``rot = exp(iθ) (..., S)`` (S <= N/2 pairs; or ``(cos θ, sin θ)``, see
    :func:`rotation`): each pair, read as a complex number, times ``rot``. Returns ``t``.

    ``"interleaved"``: pairs (2j, 2j+1) for j < S (mamba_ssm's SISO layout); ``"halves"``: pairs
    (j, j + N/2) for j < S (its MIMO kernels' layout). Entries in no pair are left as they are.
    Written back into ``t`` without autograd (no pass over the unrotated part); with autograd into
    a copy of ``t``, as autograd keeps views of it.
    """
    real = isinstance(rot, tuple)
    S, N = rot[0].shape[-1] if real else rot.shape[-1], t.shape[-1]
    if pairs == "interleaved":
        i0, i1 = slice(0, 2 * S, 2), slice(1, 2 * S, 2)
    else:
        i0, i1 = slice(0, S), slice(N // 2, N // 2 + S)
    if real:
        (c, s), a, b = rot, t[..., i0], t[..., i1]
        re, im = a * c - b * s, a * s + b * c
    else:
        r = torch.complex(t[..., i0], t[..., i1]) * rot
        re, im = r.real, r.imag
    if torch.is_grad_enabled() and (t.requires_grad or (rot[0] if real else rot).requires_grad):
        t = t.clone()  # autograd holds views of the input: write into a copy
    t[..., i0] = re
    t[..., i1] = im
    return t


def heads(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """Groups -> heads along ``dim``: head i reads group i // (H / G)."""
    g = t.shape[dim]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=dim)


def heads_plus_bias(t: torch.Tensor, bias: torch.Tensor | None, nheads: int) -> torch.Tensor:
    """``t (..., R, G, N)`` per head plus ``bias (R, H, N)`` -> ``(..., R, H, N)``, in one pass
    (the group axis is broadcast against the heads of each group); always a new tensor."""
    if bias is None:
        out = heads(t, nheads, t.dim() - 2)
        return out.clone() if out is t or out.data_ptr() == t.data_ptr() else out
    *lead, R, G, N = t.shape
    out = t.unsqueeze(-2) + bias.view(R, G, nheads // G, N)
    return out.view(*lead, R, nheads, N)


def rank_weights(w: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor | None:
    """A per-head, per-rank weight ``(H, R, P)`` as ``(R, H, P)`` (broadcast over batch and time)."""
    return None if w is None else w.to(cdt).transpose(0, 1)


def up_project(x: torch.Tensor, mimo_x: torch.Tensor | None) -> torch.Tensor:
    """``x (..., H, P) -> (..., R, H, P)``: x times each rank's weights (R = 1, x itself, for SISO)."""
    return x.unsqueeze(-3) if mimo_x is None else x.unsqueeze(-3) * mimo_x


def bias_rank(bias: torch.Tensor | None, cdt: torch.dtype, siso: bool) -> torch.Tensor | None:
    """B/C bias ``(H, N)`` (SISO) or ``(H, R, N)`` as ``(R, H, N)``."""
    if bias is None:
        return None
    bias = bias.to(cdt)
    return bias.unsqueeze(0) if siso else bias.transpose(0, 1)


def prepare(x, dt, dA, B, C, trap, angles, B_bias, C_bias, mimo_x, angle0, pairs, cdt) -> Prepared:
    """Per-token preprocessing (see :class:`Prepared`). ``B, C: (b, l, R, G, N)`` (rank axis
    present), biases ``(R, H, N)``, ``mimo_x (R, H, P)``, ``angle0 (b, H, S)``."""
    H = x.shape[2]
    dt, dA = dt.to(cdt), dA.to(cdt)
    # The accumulated angles grow without bound (~0.1 rad a token): summed in float64 and wrapped to
    # [0, 2π) before the cast, so that cos and sin keep float32 accuracy on long sequences.
    step = (torch.tanh(angles.to(cdt)) * (math.pi * dt).unsqueeze(-1)).double()
    theta = wrap_angle(torch.cumsum(step, dim=1) + angle0.double().unsqueeze(1)).to(cdt)
    rot = rotation(theta.unsqueeze(2))  # (b, l, 1, H, S): one angle per head, shared by the ranks
    q = rotate_(heads_plus_bias(C.to(cdt), C_bias, H), rot, pairs)
    k = rotate_(heads_plus_bias(B.to(cdt), B_bias, H), rot, pairs)
    v = up_project(x.to(cdt), mimo_x)
    return Prepared(q, k, v, dt, dA, torch.sigmoid(trap.to(cdt)), theta)


def epilogue(y, v, x, D, z, mimo_z, mimo_o, siso, cdt):
    """``y, v: (b, l, R, H, P)`` -> the op's output: ``y + D v``, times ``silu(z)`` per rank
    (z up-projected by ``mimo_z (R, H, P)``), summed over ranks with ``mimo_o (R, H, P)``; SISO
    drops the rank axis; MIMO without ``mimo_o`` keeps it."""
    if D is not None:
        y = y + v * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(up_project(z.to(cdt), mimo_z))
    if siso:
        return y.squeeze(2)
    if mimo_o is not None:
        return (y * mimo_o).sum(2)
    return y


def initial_parts(init: Mamba3Carry | None, nstate, H, P, N, R, S, mimo_x, cdt, device):
    """``(angle0, h0, k0, v0)`` in the compute dtype; ``v0 (n, R, H, P)`` is up-projected."""
    if init is None:
        z = functools.partial(torch.zeros, dtype=cdt, device=device)
        return z(nstate, H, S), z(nstate, H, P, N), z(nstate, R, H, N), z(nstate, R, H, P)
    return (init.angle.to(cdt), init.ssm.to(cdt), init.k.to(cdt),
            up_project(init.v.to(cdt), mimo_x))


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """``theta`` mod 2π in [0, 2π) (the gradient passes through unchanged)."""
    return theta - TWO_PI * torch.floor(theta.detach() / TWO_PI)


Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_form(core: Core, *, io_dtype: bool = False) -> Callable:
    """Wrap ``core(prep, h0, k0, v0, chunk_size) -> (y (b, l, R, H, P), h_T)`` into the full
    ``mamba3`` form signature (no validation: :func:`ssmkit.ops.mamba3.mamba3` does that).
    ``io_dtype``: also pass the inputs' dtype (``x.dtype``) as a sixth argument (a form that
    runs half-precision inputs' matmuls in half precision)."""

    @functools.wraps(core)
    def form(x, dt, dA, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None,
             mimo_z=None, mimo_o=None, rotary_pairs="interleaved", chunk_size=64, initial_state=None,
             return_final_state=False, cu_seqlens=None):
        siso = B.dim() == 4
        if siso:
            B, C = B.unsqueeze(2), C.unsqueeze(2)
        b, l, H, P = x.shape
        R, N, S = B.shape[2], B.shape[-1], angles.shape[-1]
        cdt = compute_dtype(x, dt, dA, B, C, *(initial_state or ()))
        mx, mz, mo = (rank_weights(w, cdt) for w in (mimo_x, mimo_z, mimo_o))
        nstate = b if cu_seqlens is None else cu_seqlens.numel() - 1
        angle0, h0, k0, v0 = initial_parts(initial_state, nstate, H, P, N, R, S, mx, cdt, x.device)
        xs, dts, dAs, Bs, Cs, traps, angs = x, dt, dA, B, C, trap, angles
        valid = None
        if cu_seqlens is not None:
            (xs, dts, dAs, Bs, Cs, traps, angs), valid = pad_packed(cu_seqlens, x, dt, dA, B, C, trap, angles)
        prep = prepare(xs, dts, dAs, Bs, Cs, traps, angs, bias_rank(B_bias, cdt, siso),
                       bias_rank(C_bias, cdt, siso), mx, angle0, rotary_pairs, cdt)
        y, h_T = core(prep, h0, k0, v0, chunk_size, *((x.dtype,) if io_dtype else ()))
        v = prep.v
        if valid is not None:
            y, v = unpad_packed(y, valid), unpad_packed(v, valid)
        y = epilogue(y, v, x, D, z, mz, mo, siso, cdt).to(x.dtype)
        if not return_final_state:
            return y
        return y, final_state(prep, xs, valid, angle0, h_T, k0, initial_state, cdt)

    return form


def final_state(prep: Prepared, xs, valid, angle0, h_T, k0, initial_state, cdt) -> Mamba3Carry:
    """The state after the last token of each row (of each packed sequence: its last valid
    token; an empty sequence keeps its initial state)."""
    if valid is None:
        # (copies: the state is updated in place by the step and must not alias the inputs)
        return Mamba3Carry(wrap_angle(prep.theta[:, -1]), h_T, prep.k[:, -1].clone(),
                           xs[:, -1].to(cdt, copy=True))
    lens = valid.sum(1)
    last = (lens - 1).clamp(min=0)
    rows = torch.arange(valid.shape[0], device=last.device)
    keep = (lens > 0).view(-1, 1, 1)
    angle = torch.where(keep, prep.theta[rows, last], angle0)
    k = torch.where(keep.unsqueeze(-1), prep.k[rows, last], k0)
    v_init = (initial_state.v.to(cdt) if initial_state is not None
              else xs.new_zeros(xs.shape[0], *xs.shape[2:]).to(cdt))
    v = torch.where(keep, xs[rows, last].to(cdt), v_init)
    return Mamba3Carry(wrap_angle(angle), h_T, k, v)
