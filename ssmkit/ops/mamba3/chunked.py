"""Chunked Mamba-3: the trapezoidal recurrence as SSD-style block matmuls.

Folding the β term of step t+1 into the token that wrote it turns the recurrence into a plain
linear recurrence (see README.md): with β̃_t = (1 - λ_t) Δ_t and the "augmented" state
h'_t = h_t + β̃_{t+1} Σ_r v_{t,r} k_{t,r}ᵀ,

    h'_t = α_t h'_{t-1} + Σ_r v_{t,r} (s_t k_{t,r})ᵀ,     s_t = λ_t Δ_t + β̃_{t+1}
    y_{t,r} = h'_t q_{t,r} - β̃_{t+1} Σ_r' (q_{t,r}·k_{t,r'}) v_{t,r'}

(β̃ past the last token is 0, so h'_L = h_L; h'_0 = h_0 + β̃_1 Σ_r v_{0,r} k_{0,r}ᵀ). The first line
is SSD with one scalar decay per head, run in chunks of Q tokens as Mamba-2's four stages; a
token's R ranks share its decay, so the within-chunk blocks are (Q·R x Q·R) with a weight matrix
that is constant over each (R x R) tile. The weights s_t go into that matrix's columns and into
the chunk-state decays, and the correction into its diagonal (γ_t = λ_t Δ_t instead of s_t there),
so k is used as it is and the correction costs nothing extra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register
from ssmkit.ops.mamba3._common import make_form
from ssmkit.ops.ssd._common import segsum

CPU_BLOCK = 64


def _chunk_scan(q, k, v, dA, s, gamma, h0, chunk_size):
    """``h'_t = exp(dA_t) h'_{t-1} + s_t Σ_r v_{t,r} k_{t,r}ᵀ`` and ``y_{t,r} = h'_t q_{t,r}`` minus
    ``(s_t - γ_t) Σ_r' (q_{t,r}·k_{t,r'}) v_{t,r'}``, in chunks (the weights of a token's own pair
    are γ_t, not s_t).

    ``q, k: (b, l, R, H, N)``, ``v: (b, l, R, H, P)``, ``dA, s, gamma: (b, l, H)``,
    ``h0: (b, H, P, N)``. Returns ``y (b, l, R, H, P)`` and ``h'_L``."""
    b, l, R, H, N = q.shape
    P = v.shape[-1]
    # On a CPU the (Q·R, Q·R) blocks are memory-bound passes: blocks of 64 rows measured fastest
    # for SSD, so the chunk is capped at 64 // R tokens there (the result does not depend on it).
    cap = max(CPU_BLOCK // R, 1) if q.device.type == "cpu" else chunk_size
    Q = max(min(chunk_size, l, cap), 1)
    pad = (-l) % Q
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        dA, s, gamma = (F.pad(t, (0, 0, 0, pad)) for t in (dA, s, gamma))
    c = (l + pad) // Q
    M = Q * R

    def blocks(t):  # (b, c·Q, R, H, d) -> (b, c, H, Q·R, d)
        return t.view(b, c, Q, R, H, t.shape[-1]).permute(0, 1, 4, 2, 3, 5).reshape(b, c, H, M, t.shape[-1])

    def per_token(t):  # (b, c·Q, H) -> (b, c, H, Q)
        return t.view(b, c, Q, H).permute(0, 1, 3, 2)

    def per_row(t):  # (..., Q) -> (..., Q·R): a token's value on each of its ranks
        return t.unsqueeze(-1).expand(*t.shape, R).reshape(*t.shape[:-1], M)

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    a_cum = torch.cumsum(per_token(dA), dim=-1)  # (b, c, H, Q)
    sc = per_token(s)

    # 1. within-chunk blocks: (W ∘ q kᵀ) v with W[i, j] = exp(a_{j+1} + ... + a_i) s_j for i > j,
    #    W[i, i] = γ_i (a token's own pair), 0 above the diagonal
    W = torch.exp(segsum(per_token(dA))) * sc.unsqueeze(-2)
    W = W + torch.diag_embed(per_token(gamma) - sc)
    W = W[..., :, None, :, None].expand(b, c, H, Q, R, Q, R).reshape(b, c, H, M, M)
    y = ((qc @ kc.transpose(-1, -2)) * W) @ vc  # (b, c, H, M, P)
    # 2. chunk states from zero: Σ_j exp(a_{j+1} + ... + a_Q) s_j v_j k_jᵀ -> (b, c, H, P, N)
    to_end = per_row(torch.exp(a_cum[..., -1:] - a_cum) * sc).unsqueeze(-1)
    states = (vc * to_end).transpose(-1, -2) @ kc
    # 3. pass the states between chunks
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, H, 1, 1)
    h = h0
    prev = []
    for ci in range(c):
        prev.append(h)
        h = chunk_decay[:, ci] * h + states[:, ci]
    prev_states = torch.stack(prev, dim=1)  # (b, c, H, P, N): the state entering each chunk
    # 4. state -> output: exp(a_1 + ... + a_i) q_i h_{c-1}
    y = y + (qc @ prev_states.transpose(-1, -2)) * per_row(torch.exp(a_cum)).unsqueeze(-1)
    y = y.view(b, c, H, Q, R, P).permute(0, 1, 3, 4, 2, 5).reshape(b, c * Q, R, H, P)
    return y[:, :l], h


def trapezoid_weights(prep, h0, k0, v0):
    """The linear recurrence's weights ``s, γ (b, l, H)`` and its initial state h'_0 (README.md)."""
    dt, lam = prep.dt, prep.lam
    bt = (1 - lam) * dt  # β̃_t = (1 - λ_t) Δ_t, (b, l, H)
    gamma = lam * dt
    s = gamma + F.pad(bt[:, 1:], (0, 0, 0, 1))  # γ_t + β̃_{t+1}, β̃ = 0 past the last token
    h0 = h0 + bt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", v0, k0)
    return s, gamma, h0


def _chunked_core(prep, h0, k0, v0, chunk_size):
    s, gamma, h0 = trapezoid_weights(prep, h0, k0, v0)
    return _chunk_scan(prep.q, prep.k, prep.v, prep.dA, s, gamma, h0, chunk_size)


mamba3_chunked = register("mamba3", "chunked")(make_form(_chunked_core))
