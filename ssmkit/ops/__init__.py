"""Parameter-free ops. Each op has a plain ``reference`` form and fast forms with identical
signatures, chosen by ``backend=`` (see :mod:`ssmkit.ops.dispatch`)."""

from ssmkit.ops import dispatch  # noqa: F401

# --- LTI SSMs: kernels and FFT convolution (S4, S4D) ---

# --- Mamba: selective scan, causal conv1d ---

# --- Mamba-2 (SSD) and DeltaNet (delta rule) ---
