"""Fused kernels of the decode step and the pre-norm, each with a PyTorch ``reference`` form.

* :mod:`~ssmkit.ops.fused.norm` — ``rms_norm``; ``add_rms_norm``: residual add + RMSNorm in one
  pass (``"reference"``, ``"triton"``).
* :mod:`~ssmkit.ops.fused.gated_norm` — ``gated_rms_norm``: Mamba-2's gated RMSNorm (per group,
  gate before or after the norm), forward and backward (``"reference"``, ``"triton"``).
* :mod:`~ssmkit.ops.fused.gemv` — ``norm_linear``: a GEMV with the residual add + RMSNorm in its
  prologue, for batch-1 decoding (``"reference"``, ``"triton"``).
* :mod:`~ssmkit.ops.fused.decode` — Triton forms of the Mamba step ops (``causal_conv1d_step``,
  ``selective_scan_step``) and the two ops of the batch-1 Mamba step (``causal_conv1d_step_proj``,
  ``selective_scan_step_parts``).

Importing these modules registers nothing: :func:`register_forms` (called once by
:mod:`ssmkit.ops`) lists every form and registers it with :mod:`ssmkit.ops.dispatch`. The Triton
forms are registered only where Triton is installed; kernels compile on first use.
"""

from __future__ import annotations

from ssmkit.ops import dispatch
from ssmkit.ops.fused.gated_norm import gated_rms_norm
from ssmkit.ops.fused.gemv import norm_linear
from ssmkit.ops.fused.norm import add_rms_norm, rms_norm

__all__ = ["register_forms", "rms_norm", "add_rms_norm", "norm_linear", "gated_rms_norm"]


def register_forms() -> None:
    """Register the fused forms with dispatch (idempotent)."""
    from ssmkit.ops.fused import decode, gated_norm, gemv, norm

    forms = [
        ("add_rms_norm", "reference", norm.add_rms_norm_reference),
        ("gated_rms_norm", "reference", gated_norm.gated_rms_norm_reference),
        ("norm_linear", "reference", gemv.norm_linear_reference),
        ("causal_conv1d_step_proj", "reference", decode.causal_conv1d_step_proj_reference),
        ("selective_scan_step_parts", "reference", decode.selective_scan_step_parts_reference),
    ]
    if dispatch.triton_installed():
        forms += [
            ("add_rms_norm", "triton", norm.add_rms_norm_triton),
            ("norm_linear", "triton", gemv.norm_linear_triton),
            ("causal_conv1d_step", "triton", decode.causal_conv1d_step_triton),
            ("selective_scan_step", "triton", decode.selective_scan_step_triton),
            ("causal_conv1d_step_proj", "triton", decode.causal_conv1d_step_proj_triton),
            ("selective_scan_step_parts", "triton", decode.selective_scan_step_parts_triton),
        ]
    for op, backend, fn in forms:
        dispatch.register(op, backend)(fn)
    if dispatch.triton_installed():
        # Tested under the interpreter and compiled for sm_90, not yet run on a GPU: asked for by
        # name (backend="triton" / SSMKIT_BACKEND=triton) until the GPU tests pass.
        dispatch.register("gated_rms_norm", "triton", auto=False)(gated_norm.gated_rms_norm_triton)
