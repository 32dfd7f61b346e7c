"""Reference delta rule: the recurrence, one token per step (Schlag et al. 2021; Yang et al. 2024).

In the papers' notation (S: V x K)::

    S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ,     o_t = S_t q_t,     α_t = exp(g_t)

The state tensor is stored transposed, ``h = Sᵀ: (batch, H, K, V)`` (flash-linear-attention's
layout), so the update reads h <- α h + k (β (v - α hᵀ k))ᵀ: erase what k currently retrieves,
write β v in its place.
"""

from __future__ import annotations

import torch

from ssmkit.ops.delta_rule._common import make_form
from ssmkit.ops.dispatch import register


def _reference_core(q, k, v, beta, g, chunk_size, h0):
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    state = q.new_zeros(b, h, dk, dv) if h0 is None else h0
    outs = []
    for t in range(l):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        if g is not None:
            state = state * torch.exp(g[:, t])[..., None, None]
        retrieved = torch.einsum("bhk,bhkv->bhv", kt, state)  # S k (after decay)
        state = state + kt[..., :, None] * (bt * (vt - retrieved))[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1), state


delta_rule_reference = register("delta_rule", "reference")(make_form(_reference_core))
