"""Reference Mamba-3: the trapezoidal recurrence, one token per Python iteration.

With α_t = exp(A_t Δ_t), β_t = (1 - λ_t) Δ_t α_t, γ_t = λ_t Δ_t (Mamba-3, Sec. 3.1), per head and
summed over the R ranks (R = 1 for SISO)::

    h_t = α_t h_{t-1} + β_t Σ_r v_{t-1,r} k_{t-1,r}ᵀ + γ_t Σ_r v_{t,r} k_{t,r}ᵀ      h: (P, N)
    y_{t,r} = h_t q_{t,r}

(k_0, v_0) is the carried pair of the initial state (zero without one). Slow and obviously
correct; every faster form is tested against it.
"""

from __future__ import annotations

import torch

from ssmkit.ops.dispatch import register
from ssmkit.ops.mamba3._common import make_form


def _reference_core(prep, h0, k0, v0, chunk_size):
    q, k, v = prep.q, prep.k, prep.v
    h, kp, vp = h0, k0, v0
    ys = []
    for t in range(q.shape[1]):
        dt, lam = prep.dt[:, t], prep.lam[:, t]  # (b, H)
        alpha = torch.exp(prep.dA[:, t])
        beta = (1 - lam) * dt * alpha
        gamma = lam * dt
        prev = torch.einsum("brhp,brhn->bhpn", vp, kp)
        cur = torch.einsum("brhp,brhn->bhpn", v[:, t], k[:, t])
        h = alpha[..., None, None] * h + beta[..., None, None] * prev + gamma[..., None, None] * cur
        ys.append(torch.einsum("bhpn,brhn->brhp", h, q[:, t]))
        kp, vp = k[:, t], v[:, t]
    return torch.stack(ys, dim=1), h


mamba3_reference = register("mamba3", "reference")(make_form(_reference_core))
