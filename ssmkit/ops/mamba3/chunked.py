"""Chunked Mamba-3: the trapezoidal recurrence as SSD-style block matmuls.

Folding the β term of step t+1 into the token that wrote it turns the recurrence into a plain
linear recurrence (see README.md): with β̃_t = (1 - λ_t) Δ_t and the "augmented" state
h'_t = h_t + β̃_{t+1} Σ_r v_{t,r} k_{t,r}ᵀ,

    h'_t = α_t h'_{t-1} + Σ_r v_{t,r} (s_t k_{t,r})ᵀ,     s_t = λ_t Δ_t + β̃_{t+1}
    y_{t,r} = h'_t q_{t,r} - β̃_{t+1} Σ_r' (q_{t,r}·k_{t,r'}) v_{t,r'}

(β̃ past the last token is 0, so h'_L = h_L; h'_0 = h_0 + β̃_1 Σ_r v_{0,r} k_{0,r}ᵀ). The first line
is SSD with one scalar decay per head, run in chunks of Q tokens as Mamba-2's four stages; a
token's R ranks share its decay, so the within-chunk blocks are (Q·R x Q·R) with a decay mask
that is constant over each (R x R) tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit.ops.dispatch import register
from ssmkit.ops.mamba3._common import make_form
from ssmkit.ops.ssd._common import segsum

CPU_BLOCK = 64


def _chunk_scan(q, k, v, dA, h0, chunk_size):
    """``h_t = exp(dA_t) h_{t-1} + Σ_r v_{t,r} k_{t,r}ᵀ``, ``y_{t,r} = h_t q_{t,r}`` in chunks.

    ``q, k: (b, l, R, H, N)``, ``v: (b, l, R, H, P)``, ``dA: (b, l, H)``, ``h0: (b, H, P, N)``.
    Returns ``y (b, l, R, H, P)`` and ``h_L``."""
    b, l, R, H, N = q.shape
    P = v.shape[-1]
    # On a CPU the (Q·R, Q·R) blocks are memory-bound passes: blocks of 64 rows measured fastest
    # for SSD, so the chunk is capped at 64 // R tokens there (the result does not depend on it).
    cap = max(CPU_BLOCK // R, 1) if q.device.type == "cpu" else chunk_size
    Q = max(min(chunk_size, l, cap), 1)
    pad = (-l) % Q
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        dA = F.pad(dA, (0, 0, 0, pad))
    c = (l + pad) // Q
    M = Q * R

    def blocks(t):  # (b, c·Q, R, H, d) -> (b, c, H, Q·R, d)
        return t.view(b, c, Q, R, H, t.shape[-1]).permute(0, 1, 4, 2, 3, 5).reshape(b, c, H, M, t.shape[-1])

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    a = dA.view(b, c, Q, H).permute(0, 1, 3, 2)  # (b, c, H, Q)
    a_cum = torch.cumsum(a, dim=-1)

    def per_row(t):  # (..., Q) -> (..., Q·R): a token's value on each of its ranks
        return t.unsqueeze(-1).expand(*t.shape, R).reshape(*t.shape[:-1], M)

    # 1. within-chunk blocks: (L ∘ q kᵀ) v with L[i, j] = exp(a_{j+1} + ... + a_i), i >= j
    L = torch.exp(segsum(a))  # (b, c, H, Q, Q), 0 above the diagonal
    L = L[..., :, None, :, None].expand(b, c, H, Q, R, Q, R).reshape(b, c, H, M, M)
    y = ((qc @ kc.transpose(-1, -2)) * L) @ vc  # (b, c, H, M, P)
    # 2. chunk states from zero: Σ_j exp(a_{j+1} + ... + a_Q) v_j k_jᵀ -> (b, c, H, P, N)
    decay_to_end = per_row(torch.exp(a_cum[..., -1:] - a_cum)).unsqueeze(-1)
    states = (vc * decay_to_end).transpose(-1, -2) @ kc
    # 3. pass the states between chunks
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, H, 1, 1)
    s = h0
    prev = []
    for ci in range(c):
        prev.append(s)
        s = chunk_decay[:, ci] * s + states[:, ci]
    prev_states = torch.stack(prev, dim=1)  # (b, c, H, P, N): the state entering each chunk
    # 4. state -> output: exp(a_1 + ... + a_i) q_i h_{c-1}
    y = y + (qc @ prev_states.transpose(-1, -2)) * per_row(torch.exp(a_cum)).unsqueeze(-1)
    y = y.view(b, c, H, Q, R, P).permute(0, 1, 3, 4, 2, 5).reshape(b, c * Q, R, H, P)
    return y[:, :l], s


def _chunked_core(prep, h0, k0, v0, chunk_size):
    dt, lam = prep.dt, prep.lam
    bt = (1 - lam) * dt  # β̃_t = (1 - λ_t) Δ_t, (b, l, H)
    bt_next = F.pad(bt[:, 1:], (0, 0, 0, 1))  # β̃_{t+1}, 0 past the last token
    scale = lam * dt + bt_next
    h0 = h0 + bt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", v0, k0)
    y, h = _chunk_scan(prep.q, prep.k * scale[:, :, None, :, None], prep.v, prep.dA, h0, chunk_size)
    # the diagonal correction: token t's own pair enters y_t with λ_t Δ_t only
    qk = torch.einsum("blRhn,blrhn->blhRr", prep.q, prep.k)
    corr = torch.einsum("blhRr,blrhp->blRhp", qk, prep.v)
    y = y - bt_next[:, :, None, :, None] * corr
    return y, h


mamba3_chunked = register("mamba3", "chunked")(make_form(_chunked_core))
