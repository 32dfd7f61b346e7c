"""Parameter-free ops. Each op has a plain ``reference`` form and fast forms with identical
signatures, chosen by ``backend=`` (see :mod:`ssmkit.ops.dispatch`).

* LTI SSMs (S4, S4D): :func:`ssm_kernel_diag`, :func:`ssm_kernel_dplr`, :func:`fftconv`
* Mamba: :func:`selective_scan`, :func:`selective_state_update`, :func:`causal_conv1d`,
  :func:`causal_conv1d_update`
* Mamba-2: :func:`ssd`, :func:`ssd_state_update`; DeltaNet: :func:`delta_rule`, :func:`delta_rule_step`
"""

from ssmkit.ops import dispatch, fused
from ssmkit.ops.conv.causal_conv1d import causal_conv1d, causal_conv1d_update
from ssmkit.ops.conv.fftconv import fftconv
from ssmkit.ops.conv.ssm_kernel import ssm_kernel_diag, ssm_kernel_dplr
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step
from ssmkit.ops.selective_scan import selective_scan, selective_state_update
from ssmkit.ops.ssd import ssd, ssd_state_update

fused.register_forms()

__all__ = [
    "dispatch",
    "fftconv", "ssm_kernel_diag", "ssm_kernel_dplr",
    "selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update",
    "ssd", "ssd_state_update", "delta_rule", "delta_rule_step",
]
