"""Mixture of SwiGLU experts with a top-k router (Shazeer et al., 2017; Switch, Fedus et al., 2022;
Mixtral / Jamba style).

For each token the router gives probabilities ``p = softmax(W_r x)`` over ``n_experts``; the token
goes to its ``top_k`` experts, and the output is ``sum_{e in top-k} w_e * expert_e(x)`` with
``w = p`` restricted to the top-k (renormalised to sum to 1 when ``normalize_top_k``).

Dispatch is capacity-free: every token is processed by all of its chosen experts (no token is
dropped, so results do not depend on the batch composition). ``forward`` gathers each expert's
tokens (sparse, data-dependent shapes); ``dense=True`` instead runs every expert on every token
and zeroes the unchosen ones: the same numbers with static shapes, used by the single-token decode
step so it can be captured in a CUDA graph.

Load-balancing auxiliary loss (Switch Transformer, eq. 4): ``n_experts * sum_e f_e * P_e`` where
``f_e`` is the fraction of routed (token, slot) pairs sent to expert ``e`` and ``P_e`` the mean
router probability of ``e``; it is 1 for a perfectly uniform router and grows with imbalance.
Padding tokens (``mask == 0``) are left out of it.

Shared expert (``d_shared > 0``; DeepSeekMoE, Dai et al., 2024; Granite 4.0-H): one more MLP of
width ``d_shared`` that every token goes through, added to the routed output with weight 1, or
with ``shared_gate`` with the per-token weight ``sigmoid(shared_gate(x))`` (Qwen2-MoE, Qwen3-Next).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmkit._checks import check_positive_int, check_tensor
from ssmkit.layers.linear import Linear
from ssmkit.layers.mlp import MLP


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts: ``forward(x) -> (y, aux_loss)`` with ``x: (..., d_model)``."""

    def __init__(self, d_model: int, hidden: int, n_experts: int = 8, top_k: int = 2,
                 normalize_top_k: bool = True, d_shared: int = 0, activation: str = "swiglu",
                 shared_gate: bool = False, device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_experts", n_experts)
        check_positive_int("top_k", top_k)
        if isinstance(d_shared, bool) or not isinstance(d_shared, int) or d_shared < 0:
            raise ValueError(f"d_shared must be an int >= 0 (0: no shared expert), got {d_shared!r}")
        if top_k > n_experts:
            raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.router = Linear(d_model, n_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(MLP(d_model, hidden, activation=activation, device=device, dtype=dtype)
                                     for _ in range(n_experts))
        if d_shared:
            self.shared = MLP(d_model, d_shared, activation=activation, device=device, dtype=dtype)
        if shared_gate:
            if not d_shared:
                raise ValueError("shared_gate=True needs a shared expert (d_shared > 0)")
            self.shared_gate = Linear(d_model, 1, bias=False, device=device, dtype=dtype)

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x2: (T, d_model)`` -> router probs ``(T, E)`` float32, top-k weights ``(T, k)``, indices ``(T, k)``."""
        logits = self.router(x2)
        if logits.dtype in (torch.float16, torch.bfloat16):  # route in float32 for stable top-k
            logits = logits.float()
        probs = F.softmax(logits, dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            w = w / w.sum(-1, keepdim=True)
        return probs, w, idx

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("x", x, desc=f"(..., d_model={self.d_model})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        probs, w, idx = self.route(x2)
        w = w.to(x.dtype)
        if dense:
            gate = torch.zeros(x2.shape[0], self.n_experts, device=x.device, dtype=x.dtype)
            gate.scatter_(1, idx, w)
            y = torch.zeros_like(x2)
            for e, expert in enumerate(self.experts):
                y = y + gate[:, e : e + 1] * expert(x2)
        else:
            y = torch.zeros_like(x2)
            for e, expert in enumerate(self.experts):
                tok, slot = (idx == e).nonzero(as_tuple=True)
                if tok.numel() == 0 and not torch.is_grad_enabled():
                    continue
                # An expert without tokens still runs (on none) while training: its gradient is
                # zero, not missing, so every data-parallel rank reduces the same parameters
                # (DDP's buckets and FSDP's reduce-scatters must match across ranks).
                y.index_add_(0, tok, w[tok, slot, None] * expert(x2[tok]))
        if hasattr(self, "shared"):
            s = self.shared(x2)
            y = y + (torch.sigmoid(self.shared_gate(x2)) * s if hasattr(self, "shared_gate") else s)
        aux = self.load_balancing_loss(probs, idx, mask)
        return y.reshape(shape), aux

    def load_balancing_loss(self, probs: torch.Tensor, idx: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Switch-Transformer balance loss ``E * sum_e f_e P_e`` over the non-padding tokens."""
        onehot = F.one_hot(idx, self.n_experts).to(probs.dtype).sum(1)  # (T, E): slots per expert
        if mask is not None:
            keep = mask.reshape(-1, 1).to(probs.dtype)
            n = keep.sum().clamp_min(1.0)
            f = (onehot * keep).sum(0) / (n * self.top_k)
            p = (probs * keep).sum(0) / n
        else:
            f = onehot.mean(0) / self.top_k
            p = probs.mean(0)
        return self.n_experts * (f * p).sum()

    def extra_repr(self) -> str:
        shared = f", d_shared={self.shared.hidden}" if hasattr(self, "shared") else ""
        return f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}{shared}"
