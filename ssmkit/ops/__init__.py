"""Parameter-free ops. Each op has a plain ``reference`` form and fast forms with identical
signatures, chosen by ``backend=`` (see :mod:`ssmkit.ops.dispatch`)."""

from ssmkit.ops import dispatch  # noqa: F401

# --- LTI SSMs: kernels and FFT convolution (S4, S4D) ---
from ssmkit.ops.conv.fftconv import fftconv  # noqa: E402,F401
from ssmkit.ops.conv.ssm_kernel import ssm_kernel_diag, ssm_kernel_dplr  # noqa: E402,F401

# --- Mamba: selective scan, causal conv1d ---
from ssmkit.ops.conv.causal_conv1d import causal_conv1d, causal_conv1d_update  # noqa: E402,F401
from ssmkit.ops.selective_scan import selective_scan, selective_state_update  # noqa: E402,F401

# --- Mamba-2 (SSD) and DeltaNet (delta rule) ---
from ssmkit.ops.delta_rule import delta_rule, delta_rule_step  # noqa: E402,F401
from ssmkit.ops.ssd import ssd, ssd_state_update  # noqa: E402,F401
