"""flash-linear-attention's delta-rule entry points, running on any device through ssmkit.

The four functions take fla 0.6's positional order, names, defaults and return conventions:

* ``chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
  use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs)``
* ``chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
  allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None,
  chunk_indices=None, cp_context=None, **kwargs)`` (``g`` before ``beta``)
* ``fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None)``
* ``fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None,
  initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
  use_gate_in_kernel=False, A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False,
  allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, **kwargs)`` (``beta`` is the
  7th positional argument, after fla's per-key and per-value decays ``gk, gv``)

Conventions, as in fla:

* ``q, k: (batch, seqlen, H, K)``, ``v: (batch, seqlen, Hv, V)`` with ``Hv`` a multiple of ``H``
  (grouped value heads), ``g, beta: (batch, seqlen, Hv)``; ``g`` is the log decay (α = exp(g));
* ``scale=None`` means ``K ** -0.5`` (ssmkit's own default is 1);
* ``beta=None`` (the fused-recurrent functions) means β = 1;
* ``initial_state`` and the final state are ``(batch | num_seqs, Hv, K, V)`` (``(..., V, K)``
  with ``state_v_first``), the final state float32 (float64 for float64 inputs);
* returns ``(o, final_state)`` with ``final_state`` None unless ``output_final_state``;
* ``use_beta_sigmoid_in_kernel``: ``beta`` holds logits (β = sigmoid, times 2 with
  ``allow_neg_eigval``); ``use_gate_in_kernel`` (``A_log``, ``dt_bias`` by keyword for the chunked
  form): ``g`` holds the raw gate, decay ``-exp(A_log) * softplus(g + dt_bias)``;
* ``chunk_size`` (16, 32 or 64) may be passed by keyword to the chunked functions.

Differences: float32 inputs are accepted everywhere (fla's chunked kernels want half precision);
``cu_seqlens_cpu`` and ``chunk_indices`` are accepted and not needed; ``head_first=True`` (older
fla) transposes ``(batch, H, seqlen, ...)`` inputs; per-key/value decays ``gk``/``gv`` and context
parallelism ``cp_context`` are refused. ``backend=`` (keyword) picks the ssmkit form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmkit._checks import check_tensor
from ssmkit.ops.delta_rule import delta_rule

__all__ = ["chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
           "fused_recurrent_gated_delta_rule"]

_CHUNKED_EXTRA = ("chunk_size", "head_first", "backend", "use_gate_in_kernel", "A_log", "dt_bias")


def _refuse_unknown(fn: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise TypeError(f"{fn}() got unexpected keyword arguments {extra}")


def _gate_and_beta(g, beta, *, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    if use_beta_sigmoid_in_kernel:
        cdt = torch.float64 if beta.dtype == torch.float64 else torch.float32
        beta = torch.sigmoid(beta.to(cdt)) * (2 if allow_neg_eigval else 1)
    if use_gate_in_kernel:
        if A_log is None or g is None:
            raise ValueError("use_gate_in_kernel=True needs g (the raw gate) and A_log (Hv,)")
        cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
        raw = g.to(cdt) + (0 if dt_bias is None else dt_bias.to(cdt))
        g = -torch.exp(A_log.to(cdt)) * F.softplus(raw)
    return g, beta


def _run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
         *, state_v_first=False, head_first=False, chunk_size=64, backend="auto"):
    """Shared body: layout, fla's scale default, the state layout and the (o, final_state) pair."""
    check_tensor("q", q, 4, desc="(batch, seqlen, H, K)" + (" [head_first: (batch, H, seqlen, K)]" if head_first
                                                             else ""))
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 (as in flash-linear-attention), got {chunk_size!r}")
    if head_first:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        g = None if g is None else g.transpose(1, 2)
        beta = beta.transpose(1, 2)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    out = delta_rule(q, k, v, beta=beta, g=g, scale=scale, use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
                     chunk_size=chunk_size, initial_state=initial_state, return_final_state=bool(output_final_state),
                     cu_seqlens=cu_seqlens, backend=backend)
    o, final = out if output_final_state else (out, None)
    if final is not None and state_v_first:
        final = final.transpose(-1, -2).contiguous()
    return (o.transpose(1, 2) if head_first else o), final


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """fla's ``chunk_delta_rule`` (DeltaNet; see the module docstring) -> ``(o, final_state | None)``."""
    _refuse_unknown("chunk_delta_rule", kwargs, ("chunk_size", "head_first", "backend"))
    return _run(q, k, v, None, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens, **kwargs)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, **kwargs):
    """fla's ``chunk_gated_delta_rule`` (see the module docstring); ``g=None`` is plain DeltaNet."""
    _refuse_unknown("chunk_gated_delta_rule", kwargs, _CHUNKED_EXTRA)
    if cp_context is not None:
        raise ValueError("cp_context (fla's context parallelism) is not supported; pass cp_context=None")
    gate = {n: kwargs.pop(n, None) for n in ("A_log", "dt_bias")}
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel=kwargs.pop("use_gate_in_kernel", False), **gate,
                             use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    return _run(q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens, state_v_first=state_v_first, **kwargs)


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto"):
    """fla's ``fused_recurrent_delta_rule``: as :func:`chunk_delta_rule`, ``beta=None`` meaning 1."""
    if beta is None:
        beta = torch.ones_like(v[..., 0])
    return _run(q, k, v, None, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens, backend=backend)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                                     A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False,
                                     allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, **kwargs):
    """fla's ``fused_recurrent_gated_delta_rule`` (``beta`` after ``gk, gv``; ``beta=None``: 1)."""
    _refuse_unknown("fused_recurrent_gated_delta_rule", kwargs, ("backend",))
    if gk is not None or gv is not None:
        raise ValueError("gk / gv (per-key or per-value decays) are not supported; pass the per-head decay as g")
    if beta is None:
        beta = torch.ones_like(v[..., 0])
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                             use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    return _run(q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens, state_v_first=state_v_first, **kwargs)
