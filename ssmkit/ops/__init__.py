"""Parameter-free ops. Each op has a plain ``reference`` form and fast forms with identical
signatures, chosen by ``backend=`` (see :mod:`ssmkit.ops.dispatch`). Tensors come first, in the
``(batch, seqlen, ...)`` layout; options after them are keyword-only.

* LTI SSMs (S4, S4D): :func:`ssm_kernel_diag`, :func:`ssm_kernel_dplr`, :func:`fftconv`
* Mamba: :func:`selective_scan`, :func:`causal_conv1d`
* Mamba-2: :func:`ssd`; Mamba-3: :func:`mamba3`; DeltaNet: :func:`delta_rule`
* Decoding, T >= 1 tokens from a state updated in place (state first, ``backend=`` on all):
  :func:`selective_scan_step`, :func:`causal_conv1d_step`, :func:`ssd_step`, :func:`mamba3_step`,
  :func:`delta_rule_step`
* Fused decode-step kernels (norm, GEMV, Mamba step): :mod:`ssmkit.ops.fused`
* One sequence sharded over the ranks of a process group (context parallelism):
  :mod:`ssmkit.ops.context_parallel`

Deprecated names (one release, with a ``DeprecationWarning``): ``selective_state_update``,
``ssd_state_update``, ``causal_conv1d_update`` (its ``mamba_ssm`` argument order stays in
:mod:`ssmkit.compat`).
"""

from ssmkit.ops import dispatch, fused
from ssmkit.ops.conv.causal_conv1d import causal_conv1d, causal_conv1d_step, causal_conv1d_update
from ssmkit.ops.conv.fftconv import fftconv
from ssmkit.ops.conv.ssm_kernel import ssm_kernel_diag, ssm_kernel_dplr
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step
from ssmkit.ops.mamba3 import mamba3, mamba3_step
from ssmkit.ops.selective_scan import selective_scan, selective_scan_step, selective_state_update
from ssmkit.ops.ssd import ssd, ssd_state_update, ssd_step

fused.register_forms()

__all__ = [
    "dispatch", "fused",
    "fftconv", "ssm_kernel_diag", "ssm_kernel_dplr",
    "selective_scan", "causal_conv1d", "ssd", "mamba3", "delta_rule",
    "selective_scan_step", "causal_conv1d_step", "ssd_step", "mamba3_step", "delta_rule_step",
    "selective_state_update", "ssd_state_update", "causal_conv1d_update",
]
