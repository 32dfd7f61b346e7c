"""``nn.Module`` layers: parameters and projections around the ops.

Every sequence-mixing layer ("mixer") follows one contract:

* ``forward(x, state=None, return_state=False, cu_seqlens=None, mask=None)`` on
  ``x: (batch, seqlen, d_model)``; returns ``y`` or ``(y, new_state)``. ``state`` is a state object
  from a previous call (or ``allocate_state``); it is not modified. ``mask: (batch, seqlen)``
  (1 = token, 0 = padding) keeps padded positions out of every state (left padding for batched
  generation).
* ``step(x_t, state) -> y_t`` for decoding, ``x_t: (batch, d_model)``; updates ``state`` in place.
* ``allocate_state(batch_size, device=None, dtype=None) -> LayerState`` (zeros; SSM parts float32).
"""

from ssmkit.layers.attention import Attention, KVCacheState
from ssmkit.layers.delta_net import DeltaNet, DeltaNetState, GatedDeltaNet
from ssmkit.layers.h3 import H3, H3State
from ssmkit.layers.hyena import Hyena, HyenaState
from ssmkit.layers.linear import Linear
from ssmkit.layers.mamba import Mamba, MambaState
from ssmkit.layers.mamba2 import Mamba2, Mamba2State
from ssmkit.layers.mamba3 import Mamba3, Mamba3State
from ssmkit.layers.mlp import MLP
from ssmkit.layers.moe import MoE
from ssmkit.layers.norm import RMSNorm, RMSNormGated
from ssmkit.layers.parallel import ParallelHybrid
from ssmkit.layers.s4 import S4
from ssmkit.layers.s4d import S4D, S4State
from ssmkit.layers.state import LayerState

__all__ = [
    "LayerState",
    "S4", "S4D", "S4State",  # S4 / S4D
    "Mamba", "MambaState",  # Mamba
    "Mamba2", "Mamba2State", "Mamba3", "Mamba3State", "DeltaNet", "GatedDeltaNet", "DeltaNetState",  # Mamba-2, -3, DeltaNet
    "H3", "H3State", "Hyena", "HyenaState",  # H3, Hyena
    "Attention", "KVCacheState", "MLP", "MoE", "RMSNorm", "RMSNormGated",  # attention, MLP, MoE, norms
    "Linear",  # nn.Linear with float32 CPU inference through oneDNN
    "ParallelHybrid",  # Mamba-2 and attention side by side (Falcon-H1)
]
