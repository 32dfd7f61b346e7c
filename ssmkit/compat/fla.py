"""flash-linear-attention's gated delta rule entry point, running on any device through ssmkit.

``chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None, head_first=False)``
takes fla's argument order (``g`` before ``beta``: ssmkit's :func:`~ssmkit.ops.delta_rule` takes
both by keyword), its names and its layout:

* ``q, k: (batch, seqlen, H, K)``, ``v: (batch, seqlen, H, V)``, ``g, beta: (batch, seqlen, H)``
  (``head_first=True``: ``(batch, H, seqlen, ...)``); ``g`` is the log decay (α = exp(g));
* ``initial_state``, final state: ``(batch | num_seqs, H, K, V)`` float32;
* ``scale=None`` means ``K ** -0.5``, as in fla (ssmkit's own default is 1);
* returns ``(o, final_state)``, ``final_state`` None unless ``output_final_state``.

Grouped value heads (more heads in ``v`` than in ``q``) are not supported.
"""

from __future__ import annotations

import torch

from ssmkit._checks import check_tensor
from ssmkit.ops.delta_rule import delta_rule

__all__ = ["chunk_gated_delta_rule"]


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    head_first: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` (see the module docstring); ``g=None`` is plain DeltaNet."""
    check_tensor("q", q, 4, desc="(batch, seqlen, H, K)" + (" [head_first: (batch, H, seqlen, K)]" if head_first else ""))
    if head_first:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        g = None if g is None else g.transpose(1, 2)
        beta = beta.transpose(1, 2)
    if v.dim() == 4 and v.shape[2] != q.shape[2]:
        raise ValueError(f"v must have the H={q.shape[2]} heads of q (grouped value heads are not supported), "
                         f"got shape {tuple(v.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = delta_rule(q, k, v, beta=beta, g=g, scale=scale, use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
                     initial_state=initial_state, return_final_state=bool(output_final_state),
                     cu_seqlens=cu_seqlens, backend=backend)
    o, final = out if output_final_state else (out, None)
    return (o.transpose(1, 2) if head_first else o), final
