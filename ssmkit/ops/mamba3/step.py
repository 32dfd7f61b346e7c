"""Mamba-3 decoding: advance a :class:`Mamba3Carry` in place by T >= 1 tokens.

Per token (see reference.py): θ += tanh(angle)·π·Δ; q, k rotated by θ; then two rank-R writes
into the state, the previous token's (β) and this token's (γ), after its decay::

    h <- α h + β Σ_r v_{prev,r} k_{prev,r}ᵀ + γ Σ_r v_r k_rᵀ,     y_r = h q_r

and (k, v) become the carried pair. SISO's writes are rank-1 updates in place; MIMO's are
``(P, R) @ (R, N)`` matmuls per head accumulated in place; the readout is one batched matmul.
"""

from __future__ import annotations

import math

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.mamba3._common import (
    bias_rank,
    epilogue,
    heads_plus_bias,
    rank_weights,
    rotate_,
    rotation,
    up_project,
    wrap_angle,
)


def mamba3_step_one(state, x, dt, dA, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None,
                    mimo_x=None, mimo_z=None, mimo_o=None, rotary_pairs="interleaved"):
    """One token: ``x (b, H, P)``, ``dt, dA, trap (b, H)``, ``B, C (b, R, G, N)`` (rank axis
    present), ``angles (b, H, S)``; biases and MIMO weights in the op's layout. Returns the
    per-token output before the SISO squeeze: ``(b, R, H, P)`` or ``(b, H, P)`` summed with mimo_o."""
    sdt = state.ssm.dtype
    H = x.shape[1]
    siso = mimo_x is None
    mx, mz, mo = (rank_weights(w, sdt) for w in (mimo_x, mimo_z, mimo_o))
    dt, dA = dt.to(sdt), dA.to(sdt)
    theta = state.angle + torch.tanh(angles.to(sdt)) * (math.pi * dt).unsqueeze(-1)  # (b, H, S)
    rot = rotation(theta.unsqueeze(1))
    q = rotate_(heads_plus_bias(C.to(sdt), bias_rank(C_bias, sdt, siso), H), rot, rotary_pairs)  # (b, R, H, N)
    k = rotate_(heads_plus_bias(B.to(sdt), bias_rank(B_bias, sdt, siso), H), rot, rotary_pairs)
    v = up_project(x.to(sdt), mx)  # (b, R, H, P)
    vp = up_project(state.v.to(sdt), mx)
    lam = torch.sigmoid(trap.to(sdt))
    alpha = torch.exp(dA)
    beta = ((1 - lam) * dt * alpha)[..., None, None]  # (b, H, 1, 1)
    gamma = (lam * dt)[..., None, None]
    h = state.ssm
    h.mul_(alpha[..., None, None])
    b, R, _, N = k.shape
    P = h.shape[2]
    if R == 1:  # two rank-1 writes in place (a broadcast matmul is several times slower on a CPU)
        h.addcmul_((vp[:, 0] * beta[..., 0]).unsqueeze(-1), state.k[:, 0].to(sdt).unsqueeze(-2))
        h.addcmul_((v[:, 0] * gamma[..., 0]).unsqueeze(-1), k[:, 0].unsqueeze(-2))
    else:  # rank-R writes: (P, R) @ (R, N) per (batch, head), accumulated in place
        hv = h.view(b * H, P, N)
        hv.baddbmm_((vp * beta.view(b, 1, H, 1)).permute(0, 2, 3, 1).reshape(b * H, P, R),
                    state.k.to(sdt).transpose(1, 2).reshape(b * H, R, N))
        hv.baddbmm_((v * gamma.view(b, 1, H, 1)).permute(0, 2, 3, 1).reshape(b * H, P, R),
                    k.transpose(1, 2).reshape(b * H, R, N))
    y = (h @ q.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (b, H, P, R) -> (b, R, H, P)
    state.angle.copy_(wrap_angle(theta))
    state.k.copy_(k)
    state.v.copy_(x)
    out = epilogue(y.unsqueeze(1), v.unsqueeze(1), x, D, None if z is None else z.unsqueeze(1),
                   mz, mo, siso, sdt)
    return out.squeeze(1)


@register("mamba3_step", "reference")
def mamba3_step_reference(state, x, dt, dA, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None,
                          mimo_x=None, mimo_z=None, mimo_o=None, rotary_pairs="interleaved"):
    """T tokens (no validation): every per-token argument with a ``T`` axis after batch, ``B, C``
    with the rank axis; one :func:`mamba3_step_one` per token."""
    ys = [mamba3_step_one(state, x[:, t], dt[:, t], dA[:, t], B[:, t], C[:, t], trap[:, t], angles[:, t], D,
                          None if z is None else z[:, t], B_bias, C_bias, mimo_x, mimo_z, mimo_o, rotary_pairs)
          for t in range(x.shape[1])]
    return torch.stack(ys, 1).to(x.dtype)
