"""One decoding step of the (gated) delta rule, updating the state ``(batch, H, K, V)`` in place."""

from __future__ import annotations

import torch

from ssmkit.ops.delta_rule._common import per_value_head, prepare_qk


def delta_step(state, q, k, v, beta, g=None, scale=None, use_qk_l2norm=False):
    """``state (batch, Hv, K, V)``, ``q, k (batch, H, K)``, ``v (batch, Hv, V)``, ``beta, g (batch, Hv)``."""
    sdt = state.dtype
    q, k, v, beta = q.to(sdt), k.to(sdt), v.to(sdt), beta.to(sdt)
    q, k = prepare_qk(q, k, use_qk_l2norm, scale)
    q, k = per_value_head(q, v.shape[-2]), per_value_head(k, v.shape[-2])
    if g is not None:
        state.mul_(torch.exp(g.to(sdt))[..., None, None])
    retrieved = (k.unsqueeze(-2) @ state).squeeze(-2)  # (b, h, V): hᵀ k
    state.add_(k.unsqueeze(-1) * (beta.unsqueeze(-1) * (v - retrieved)).unsqueeze(-2))
    return (q.unsqueeze(-2) @ state).squeeze(-2)
