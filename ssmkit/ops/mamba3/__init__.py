"""Mamba-3's trapezoidal, rotary SSM (SISO and MIMO): ``mamba3`` and ``mamba3_step`` (decoding,
T >= 1 tokens).

Forms registered under op name ``"mamba3"``: ``reference`` (recurrence), ``chunked`` (SSD-style
block matmuls) and ``triton`` (the chunked scan's kernels, forward and backward; only when asked
for by name); ``"mamba3_step"``: ``reference`` and ``triton`` (one kernel; only when asked for by
name). See README.md.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_cu_seqlens, check_positive_int, check_same_device, check_tensor, read_values
from ssmkit.ops import dispatch
from ssmkit.ops.mamba3 import chunked, reference, step, triton  # noqa: F401  (registers the forms)
from ssmkit.ops.mamba3._common import Mamba3Carry

__all__ = ["mamba3", "mamba3_step", "Mamba3Carry"]

PAIRS = ("interleaved", "halves")


def _check_common(x, dt, dA, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, rotary_pairs,
                  lead, names):
    """Shape checks shared by ``mamba3`` (lead = (batch, seqlen)) and the step (lead = (batch,) or
    (batch, T)). Returns ``(H, P, R, G, N, S, siso)``."""
    nl = len(lead)
    H, P = x.shape[nl], x.shape[nl + 1]
    for name, t in (("dt", dt), ("dA", dA), ("trap", trap)):
        check_tensor(name, t, shape=(*lead, H), desc=f"({names}, H={H})")
    check_tensor("B", B, (nl + 2, nl + 3), desc=f"({names}, G, N) or ({names}, R, G, N) for MIMO")
    if tuple(B.shape[:nl]) != tuple(lead):
        raise ValueError(f"B must have shape ({names}, [R,] G, N) with leading dims {tuple(lead)}, got {tuple(B.shape)}")
    siso = B.dim() == nl + 2
    R = 1 if siso else B.shape[nl]
    G, N = B.shape[-2], B.shape[-1]
    if G == 0 or H % G:
        raise ValueError(f"the number of groups G={G} (B.shape[-2]) must divide the number of heads H={H}")
    check_tensor("C", C, shape=tuple(B.shape), desc=f"like B {tuple(B.shape)}")
    check_tensor("angles", angles, nl + 2, desc=f"({names}, H={H}, S)")
    S = angles.shape[-1]
    if tuple(angles.shape[:-1]) != (*lead, H) or not 1 <= S <= N // 2:
        raise ValueError(f"angles must have shape ({names}, H={H}, S) with 1 <= S <= N/2 = {N // 2}, "
                         f"got {tuple(angles.shape)}")
    if rotary_pairs not in PAIRS:
        raise ValueError(f"rotary_pairs must be one of {PAIRS}, got {rotary_pairs!r}")
    check_tensor("D", D, shape=(H,), desc=f"(H={H},)", allow_none=True)
    check_tensor("z", z, shape=tuple(x.shape), desc=f"like x {tuple(x.shape)}", allow_none=True)
    bshape = (H, N) if siso else (H, R, N)
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        check_tensor(name, t, shape=bshape, desc=str(bshape), allow_none=True)
    if siso:
        given = [n for n, t in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)) if t is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given but B, C have no rank axis (SISO); pass B, C as "
                             f"({names}, R, G, N) for MIMO")
    else:
        check_tensor("mimo_x", mimo_x, shape=(H, R, P), desc=f"(H={H}, R={R}, P={P})")
        for name, t in (("mimo_z", mimo_z), ("mimo_o", mimo_o)):
            check_tensor(name, t, shape=(H, R, P), desc=f"(H={H}, R={R}, P={P})", allow_none=True)
        if z is not None and mimo_z is None:
            raise ValueError("z given for MIMO (B, C with a rank axis) but mimo_z is None")
    check_same_device(x=x, dt=dt, dA=dA, B=B, C=C, trap=trap, angles=angles, D=D, z=z, B_bias=B_bias,
                      C_bias=C_bias, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o)
    return H, P, R, G, N, S, siso


def _check_state(name, st, n, H, P, R, N, S, who):
    if not isinstance(st, Mamba3Carry):
        raise TypeError(f"{name} must be a Mamba3Carry (angle, ssm, k, v), got {type(st).__name__}")
    for field, shape in (("angle", (n, H, S)), ("ssm", (n, H, P, N)), ("k", (n, R, H, N)), ("v", (n, H, P))):
        check_tensor(f"{name}.{field}", getattr(st, field), shape=shape,
                     desc=f"({who}={n}, {', '.join(map(str, shape[1:]))})")


def mamba3(
    x: torch.Tensor,
    dt: torch.Tensor,
    dA: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    mimo_x: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    rotary_pairs: str = "interleaved",
    chunk_size: int = 64,
    initial_state: Mamba3Carry | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
):
    """Mamba-3's SSM (Lahoti et al. 2026): trapezoidal discretisation, data-dependent rotations of
    the state, SISO or rank-R MIMO.

    Per head, with λ = sigmoid(trap), α = exp(dA), θ_t = θ_{t-1} + tanh(angles_t)·π·Δ_t and
    q = rot_θ(C + C_bias), k = rot_θ(B + B_bias), v_r = x ⊙ mimo_x[:, r] (v = x for SISO)::

        h_t = α_t h_{t-1} + (1 - λ_t) Δ_t α_t Σ_r v_{t-1,r} k_{t-1,r}ᵀ + λ_t Δ_t Σ_r v_{t,r} k_{t,r}ᵀ
        y_{t,r} = h_t q_{t,r} + D v_{t,r},   then ⊙ silu(z ⊙ mimo_z[:, r]),   then Σ_r mimo_o[:, r] ⊙ y_{t,r}

    Shapes: ``x: (batch, seqlen, H, P)``; ``dt`` (Δ >= 0), ``dA`` (log decays A·Δ, <= 0 for a
    decaying state) and ``trap`` (before the sigmoid): ``(batch, seqlen, H)``; ``B, C: (batch,
    seqlen, G, N)`` (SISO) or ``(batch, seqlen, R, G, N)`` (MIMO), G dividing H; ``angles:
    (batch, seqlen, H, S)`` (before tanh, S <= N/2 rotated pairs: ``rotary_pairs`` "interleaved"
    pairs (2j, 2j+1), "halves" pairs (j, j + N/2)); ``D: (H,)``; ``z`` like ``x``; ``B_bias,
    C_bias: (H, N)`` SISO, ``(H, R, N)`` MIMO; ``mimo_x, mimo_z, mimo_o: (H, R, P)`` (MIMO only;
    ``mimo_x`` required; without ``mimo_o`` the output keeps the rank axis, ``(batch, seqlen, R,
    H, P)``). ``initial_state``: a :class:`Mamba3Carry` (the carried state) with batch (or, with ``cu_seqlens``
    ``(num_seqs + 1,)``, batch 1 and sequences packed along seqlen, num_seqs) rows.

    Returns ``y`` (``(batch, seqlen, H, P)``, x's dtype), and with ``return_final_state`` also
    the final :class:`Mamba3Carry` (float32; float64 for float64 inputs). ``check``: also check
    ``cu_seqlens``' values (None: only for CPU tensors).
    """
    check_tensor("x", x, 4, desc="(batch, seqlen, H, P)")
    b, l, H, P = x.shape
    if l == 0:
        raise ValueError("x must have seqlen >= 1, got 0")
    H, P, R, G, N, S, siso = _check_common(x, dt, dA, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z,
                                           mimo_o, rotary_pairs, (b, l), "batch, seqlen")
    check_positive_int("chunk_size", chunk_size)
    check_cu_seqlens(cu_seqlens, b, l, read_values(check, x))
    nstate = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state("initial_state", initial_state, nstate, H, P, R, N, S,
                     "batch" if cu_seqlens is None else "num_seqs")
    fn = dispatch.get("mamba3", backend, x)
    return fn(x, dt, dA, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, rotary_pairs,
              chunk_size, initial_state, return_final_state, cu_seqlens)


def mamba3_step(
    state: Mamba3Carry,
    x: torch.Tensor,
    dt: torch.Tensor,
    dA: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    mimo_x: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    rotary_pairs: str = "interleaved",
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba-3 decoding: advance ``state`` (a :class:`Mamba3Carry`, updated in place) by T >= 1
    tokens and return ``y``: :func:`mamba3` continued from ``state``.

    One token: ``x: (batch, H, P)``, ``dt, dA, trap: (batch, H)``, ``B, C: (batch, [R,] G, N)``,
    ``angles: (batch, H, S)``; T tokens: a ``T`` axis after batch on each. Parameters as in
    :func:`mamba3`.
    """
    check_tensor("x", x, (3, 4), desc="(batch, H, P) or (batch, T, H, P)")
    single = x.dim() == 3
    lead = (x.shape[0],) if single else tuple(x.shape[:2])
    H, P, R, G, N, S, siso = _check_common(x, dt, dA, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z,
                                           mimo_o, rotary_pairs, lead, "batch" if single else "batch, T")
    _check_state("state", state, x.shape[0], H, P, R, N, S, "batch")
    if single:
        x, dt, dA, B, C, trap, angles = (t.unsqueeze(1) for t in (x, dt, dA, B, C, trap, angles))
        z = None if z is None else z.unsqueeze(1)
    if siso:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    y = dispatch.get("mamba3_step", backend, x)(state, x, dt, dA, B, C, trap, angles, D, z, B_bias, C_bias,
                                                  mimo_x, mimo_z, mimo_o, rotary_pairs)
    return y.squeeze(1) if single else y
