"""Drop-in function names, argument orders and layouts of other packages, running on any device
through ssmkit (positional signatures kept as the peers have them).

* :mod:`ssmkit.compat.mamba_ssm`: ``selective_scan_fn``, ``selective_state_update``,
  ``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined`` (``mamba_ssm``) and
  ``causal_conv1d_update`` (``causal_conv1d``);
* :mod:`ssmkit.compat.fla`: ``chunk_delta_rule``, ``chunk_gated_delta_rule`` (``g`` before ``beta``),
  ``fused_recurrent_delta_rule``, ``fused_recurrent_gated_delta_rule`` (flash-linear-attention).
"""

from ssmkit.compat.fla import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from ssmkit.compat.mamba_ssm import (
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

__all__ = ["selective_scan_fn", "selective_state_update", "mamba_chunk_scan_combined",
           "mamba_split_conv1d_scan_combined", "causal_conv1d_update",
           "chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
           "fused_recurrent_gated_delta_rule"]
