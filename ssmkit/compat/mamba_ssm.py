"""Drop-in replacements for ``mamba_ssm``'s functional API, running on any device through ssmkit.

``from ssmkit.compat.mamba_ssm import selective_scan_fn`` takes the same arguments and the same
``(batch, dim, seqlen)`` layout as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``;
``mamba_chunk_scan_combined`` and ``mamba_split_conv1d_scan_combined`` match
``mamba_ssm.ops.triton.ssd_combined``; ``causal_conv1d_update``
the ``causal_conv1d`` package's (``x`` first, ``(batch, dim[, seqlen])``).
"""

from ssmkit.compat.mamba1 import causal_conv1d_update, selective_scan_fn, selective_state_update
from ssmkit.compat.mamba2 import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined

__all__ = ["selective_scan_fn", "selective_state_update", "mamba_chunk_scan_combined",
           "mamba_split_conv1d_scan_combined", "causal_conv1d_update"]
