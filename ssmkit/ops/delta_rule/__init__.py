"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet): ``delta_rule`` and
``delta_rule_step``.

Forms registered under op name ``"delta_rule"``: ``reference`` (recurrence), ``chunked``
(WY / UT transform) and ``triton`` (opt-in: ``backend="triton"``); ``"delta_rule_step"``:
``reference`` and ``triton`` (one fused kernel; opt-in). See README.md.

``beta`` and ``g`` are keyword-only: flash-linear-attention's ``chunk_gated_delta_rule`` takes
``(q, k, v, g, beta)``, and both have the shape ``(batch, seqlen, H)``, so a positional port would
swap them silently. A positional call still works for now, with a ``DeprecationWarning``;
:func:`ssmkit.compat.chunk_gated_delta_rule` keeps fla's order.
"""

from __future__ import annotations

import warnings

import torch

from ssmkit._checks import check_cu_seqlens, check_positive_int, check_same_device, check_tensor, read_values
from ssmkit.ops import dispatch
from ssmkit.ops.delta_rule import chunked, reference, triton  # noqa: F401  (registers the forms)
from ssmkit.ops.delta_rule.step import delta_step
from ssmkit.ops.dispatch import register

__all__ = ["delta_rule", "delta_rule_step"]


def _check_qkvbg(q, k, v, beta, g, lead, names):
    """Shapes of q, k, v, beta, g; returns (H, Hv, K, V). ``v`` may have more heads than q and k
    (grouped value heads: Hv a multiple of H); beta, g and the state are per value head."""
    nl = len(lead)
    H, K = q.shape[nl], q.shape[nl + 1]
    check_tensor("k", k, shape=tuple(q.shape), desc=f"like q {tuple(q.shape)}")
    check_tensor("v", v, nl + 2, desc=f"({names}, Hv, V)")
    Hv = v.shape[nl]
    if tuple(v.shape[:nl]) != tuple(lead) or Hv % H:
        raise ValueError(f"v must have shape ({names}, Hv, V) with Hv a multiple of H={H} (the heads of q), "
                         f"got {tuple(v.shape)}")
    check_tensor("beta", beta, shape=(*lead, Hv), desc=f"({names}, Hv={Hv})")
    check_tensor("g", g, shape=(*lead, Hv), desc=f"({names}, Hv={Hv})", allow_none=True)
    check_same_device(q=q, k=k, v=v, beta=beta, g=g)
    return H, Hv, K, v.shape[-1]


def _check_scale(scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


_RULE_DEFAULTS = dict(beta=None, g=None, scale=None, use_qk_l2norm=False, chunk_size=64, initial_state=None,
                     return_final_state=False, cu_seqlens=None, backend="auto")
_STEP_DEFAULTS = dict(beta=None, g=None, scale=None, use_qk_l2norm=False)


def _legacy_positional(fn_name: str, args: tuple, opts: dict, defaults: dict) -> dict:
    """Map the old positional ``(beta, g, ...)`` onto the keywords, with a DeprecationWarning."""
    names = list(defaults)
    if len(args) > len(names):
        raise TypeError(f"{fn_name}() got {len(args)} positional arguments after the tensors; "
                        f"at most {len(names)} ({', '.join(names)}), and those by keyword")
    warnings.warn(f"{fn_name}: pass beta= and g= (and the options) by keyword; positional beta, g are "
                  "deprecated (flash-linear-attention orders them g, beta)", DeprecationWarning, stacklevel=3)
    for name, val in zip(names, args):
        if opts[name] is not defaults[name]:
            raise TypeError(f"{fn_name}() got multiple values for argument {name!r}")
        opts[name] = val
    return opts


def _require_beta(fn_name: str, beta) -> None:
    if beta is None:
        raise TypeError(f"{fn_name}() missing required keyword argument 'beta' (batch, seqlen, H)")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *legacy,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
):
    """(Gated) delta rule: S_t = α_t S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

    Shapes: ``q, k: (batch, seqlen, H, K)``, ``v: (batch, seqlen, Hv, V)``, ``beta: (batch,
    seqlen, Hv)`` (write strength, usually in (0, 1); required), ``g: (batch, seqlen, Hv)`` log
    decay (α = exp(g), g <= 0; None: plain DeltaNet), ``initial_state: (batch, Hv, K, V)`` — the
    transpose of S, as flash-linear-attention stores it — or ``(num_seqs, Hv, K, V)`` with
    ``cu_seqlens`` (batch 1, sequences packed along seqlen). ``Hv`` is a multiple of ``H``
    (grouped value heads): value head ``j`` reads query/key head ``j // (Hv // H)``.

    ``use_qk_l2norm`` L2-normalises q and k per head first (keeps I - β k kᵀ a contraction for
    β in (0, 2)); ``scale`` multiplies q afterwards (None: 1). ``check``: also check the values of
    ``cu_seqlens`` (None: only for CPU tensors). Returns ``o: (batch, seqlen, Hv, V)`` in q's
    dtype, and with ``return_final_state`` the final state ``(batch | num_seqs, Hv, K, V)`` in
    float32 (float64 for float64 inputs).

    Everything after ``v`` is keyword-only; the old positional ``(q, k, v, beta, g, ...)`` still
    works with a ``DeprecationWarning``.
    """
    opts = dict(beta=beta, g=g, scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
                initial_state=initial_state, return_final_state=return_final_state, cu_seqlens=cu_seqlens,
                backend=backend)
    if legacy:
        opts = _legacy_positional("delta_rule", legacy, opts, _RULE_DEFAULTS)
    _require_beta("delta_rule", opts["beta"])
    return _delta_rule(q, k, v, check=check, **opts)


def delta_rule_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *legacy,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decoding: advance ``state (batch, Hv, K, V)`` in place by T >= 1 tokens and return ``o``.

    One token: ``q, k: (batch, H, K)``, ``v: (batch, Hv, V)``, ``beta, g: (batch, Hv)`` ->
    ``o: (batch, Hv, V)``; T tokens: a ``T`` axis after batch on each (``o: (batch, T, Hv, V)``).
    Same options as :func:`delta_rule`, which it continues from ``state``; keyword-only (the old
    positional ``beta, g`` warn). ``state_batch_indices: (batch,)`` integer: row ``i`` of the
    batch reads and updates ``state[state_batch_indices[i]]`` of a ``state (num_slots, Hv, K, V)``
    pool (distinct indices; None: row i uses ``state[i]``).
    """
    opts = dict(beta=beta, g=g, scale=scale, use_qk_l2norm=use_qk_l2norm)
    if legacy:
        opts = _legacy_positional("delta_rule_step", legacy, opts, _STEP_DEFAULTS)
    _require_beta("delta_rule_step", opts["beta"])
    return _delta_rule_step(state, q, k, v, backend=backend, state_batch_indices=state_batch_indices, **opts)


def _delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
):
    """:func:`delta_rule` after the argument handling."""
    check_tensor("q", q, 4, desc="(batch, seqlen, H, K)")
    b, l = q.shape[:2]
    if l == 0:
        raise ValueError("q must have seqlen >= 1, got 0")
    H, Hv, K, V = _check_qkvbg(q, k, v, beta, g, (b, l), "batch, seqlen")
    _check_scale(scale)
    check_positive_int("chunk_size", chunk_size)
    check_cu_seqlens(cu_seqlens, b, l, read_values(check, q))
    nstate = b if cu_seqlens is None else cu_seqlens.numel() - 1
    who = "batch" if cu_seqlens is None else "num_seqs"
    check_tensor("initial_state", initial_state, shape=(nstate, Hv, K, V),
                 desc=f"({who}={nstate}, Hv={Hv}, K={K}, V={V})", allow_none=True)
    fn = dispatch.get("delta_rule", backend, q)
    out = fn(q, k, v, beta, g, scale, use_qk_l2norm, chunk_size, initial_state, return_final_state, cu_seqlens)
    if return_final_state:
        return out[0].to(q.dtype), out[1]
    return out.to(q.dtype)


@register("delta_rule_step", "reference")
def delta_rule_step_reference(state, q, k, v, beta, g, scale, use_qk_l2norm, state_batch_indices=None):
    """T tokens, ``q, k: (batch, T, H, K)`` (no validation): one recurrence step per token."""
    work = state if state_batch_indices is None else state[state_batch_indices]
    outs = [delta_step(work, q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t],
                       scale, use_qk_l2norm) for t in range(q.shape[1])]
    if state_batch_indices is not None:
        state[state_batch_indices] = work
    return torch.stack(outs, 1)


def _delta_rule_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`delta_rule_step` after the argument handling."""
    check_tensor("q", q, (3, 4), desc="(batch, H, K) or (batch, T, H, K)")
    single = q.dim() == 3
    lead = (q.shape[0],) if single else tuple(q.shape[:2])
    H, Hv, K, V = _check_qkvbg(q, k, v, beta, g, lead, "batch" if single else "batch, T")
    _check_scale(scale)
    b = q.shape[0]
    if state_batch_indices is None:
        check_tensor("state", state, shape=(b, Hv, K, V), desc=f"(batch={b}, Hv={Hv}, K={K}, V={V})")
    else:
        check_tensor("state", state, shape=(None, Hv, K, V), desc=f"(num_slots, Hv={Hv}, K={K}, V={V})")
        check_tensor("state_batch_indices", state_batch_indices, shape=(b,), floating=False,
                     desc=f"(batch={b},) integer")
        if state_batch_indices.is_floating_point() or state_batch_indices.is_complex():
            raise TypeError(f"state_batch_indices must be an integer tensor, got {state_batch_indices.dtype}")
        check_same_device(state=state, state_batch_indices=state_batch_indices)
        if read_values(None, state) and b and not (0 <= int(state_batch_indices.min())
                                                   and int(state_batch_indices.max()) < state.shape[0]):
            raise ValueError(f"state_batch_indices must lie in [0, {state.shape[0]}) (the slots of state), "
                             f"got {state_batch_indices.tolist()}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    if single:
        q, k, v, beta = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), beta.unsqueeze(1)
        g = None if g is None else g.unsqueeze(1)
    o = dispatch.get("delta_rule_step", backend, q)(state, q, k, v, beta, g, scale, use_qk_l2norm,
                                                    state_batch_indices)
    return (o.squeeze(1) if single else o).to(q.dtype)
