"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet): ``delta_rule`` and
``delta_rule_step``.

Forms registered under op name ``"delta_rule"``: ``reference`` (recurrence) and ``chunked``
(WY / UT transform). See README.md.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_cu_seqlens, check_positive_int, check_same_device, check_tensor
from ssmkit.ops import dispatch
from ssmkit.ops.delta_rule import chunked, reference  # noqa: F401  (registers the forms)
from ssmkit.ops.delta_rule.step import delta_step

__all__ = ["delta_rule", "delta_rule_step"]


def _check_qkvbg(q, k, v, beta, g, lead, names):
    nl = len(lead)
    H, K = q.shape[nl], q.shape[nl + 1]
    check_tensor("k", k, shape=tuple(q.shape), desc=f"like q {tuple(q.shape)}")
    check_tensor("v", v, nl + 2, desc=f"({names}, H, V)")
    if tuple(v.shape[: nl + 1]) != (*lead, H):
        raise ValueError(f"v must have shape ({names}, H={H}, V), got {tuple(v.shape)}")
    check_tensor("beta", beta, shape=(*lead, H), desc=f"({names}, H={H})")
    check_tensor("g", g, shape=(*lead, H), desc=f"({names}, H={H})", allow_none=True)
    check_same_device(q=q, k=k, v=v, beta=beta, g=g)
    return H, K, v.shape[-1]


def _check_scale(scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
):
    """(Gated) delta rule: S_t = α_t S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

    Shapes: ``q, k: (batch, seqlen, H, K)``, ``v: (batch, seqlen, H, V)``, ``beta: (batch,
    seqlen, H)`` (write strength, usually in (0, 1)), ``g: (batch, seqlen, H)`` log decay
    (α = exp(g), g <= 0; None: plain DeltaNet), ``initial_state: (batch, H, K, V)`` — the
    transpose of S, as flash-linear-attention stores it — or ``(num_seqs, H, K, V)`` with
    ``cu_seqlens`` (batch 1, sequences packed along seqlen).

    ``use_qk_l2norm`` L2-normalises q and k per head first (keeps I - β k kᵀ a contraction for
    β in (0, 2)); ``scale`` multiplies q afterwards (None: 1). Returns ``o: (batch, seqlen, H, V)``
    in q's dtype, and with ``return_final_state`` the final state
    ``(batch | num_seqs, H, K, V)`` in float32 (float64 for float64 inputs).
    """
    check_tensor("q", q, 4, desc="(batch, seqlen, H, K)")
    b, l = q.shape[:2]
    if l == 0:
        raise ValueError("q must have seqlen >= 1, got 0")
    H, K, V = _check_qkvbg(q, k, v, beta, g, (b, l), "batch, seqlen")
    _check_scale(scale)
    check_positive_int("chunk_size", chunk_size)
    check_cu_seqlens(cu_seqlens, b, l)
    nstate = b if cu_seqlens is None else cu_seqlens.numel() - 1
    who = "batch" if cu_seqlens is None else "num_seqs"
    check_tensor("initial_state", initial_state, shape=(nstate, H, K, V),
                 desc=f"({who}={nstate}, H={H}, K={K}, V={V})", allow_none=True)
    fn = dispatch.get("delta_rule", backend, q)
    out = fn(q, k, v, beta, g, scale, use_qk_l2norm, chunk_size, initial_state, return_final_state, cu_seqlens)
    if return_final_state:
        return out[0].to(q.dtype), out[1]
    return out.to(q.dtype)


def delta_rule_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """One decoding step: updates ``state (batch, H, K, V)`` in place, returns ``o: (batch, H, V)``.

    ``q, k: (batch, H, K)``, ``v: (batch, H, V)``, ``beta, g: (batch, H)``; same options as
    :func:`delta_rule`, of which it is the length-1 case.
    """
    check_tensor("q", q, 3, desc="(batch, H, K)")
    b = q.shape[0]
    H, K, V = _check_qkvbg(q, k, v, beta, g, (b,), "batch")
    _check_scale(scale)
    check_tensor("state", state, shape=(b, H, K, V), desc=f"(batch={b}, H={H}, K={K}, V={V})")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    return delta_step(state, q, k, v, beta, g, scale, use_qk_l2norm).to(q.dtype)
