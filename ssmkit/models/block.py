"""One residual block of a language model and the factory that builds its mixer by letter.

Pre-norm residual (as ``mamba_ssm``'s ``Block`` with ``fused_add_norm`` unrolled)::

    h = h + mixer(norm(h))
    h = h + mlp(norm2(h))        # only when the layer has an MLP (SwiGLU or MoE)

The residual stream ``h`` is kept in float32 when ``residual_in_fp32`` (the norms' inputs are cast
to the weights' dtype first, as mamba_ssm does).
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ssmkit.layers.attention import Attention, normalize_attn_cfg
from ssmkit.layers.mlp import MLP
from ssmkit.layers.moe import MoE
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.state import LayerState
from ssmkit.models.config import LAYER_LETTERS, ModelConfig

# letter -> (module, class name, ModelConfig field with its kwargs). Imported lazily: a model only
# needs the mixers its pattern uses.
MIXERS: dict[str, tuple[str, str, str]] = {
    "M": ("ssmkit.layers.mamba", "Mamba", "ssm_cfg"),
    "2": ("ssmkit.layers.mamba2", "Mamba2", "mamba2_cfg"),
    "A": ("ssmkit.layers.attention", "Attention", "attn_cfg"),
    "D": ("ssmkit.layers.delta_net", "DeltaNet", "deltanet_cfg"),
    "G": ("ssmkit.layers.delta_net", "GatedDeltaNet", "deltanet_cfg"),
    "S": ("ssmkit.layers.s4d", "S4D", "s4d_cfg"),
}


def mixer_class(letter: str) -> type[nn.Module]:
    modname, clsname, _ = MIXERS[letter]
    try:
        return getattr(importlib.import_module(modname), clsname)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"layer letter {letter!r} ({LAYER_LETTERS[letter]}) needs {modname}.{clsname}, "
            f"which is not available in this installation: {e}"
        ) from e


def mixer_kwargs(letter: str, config: ModelConfig) -> dict:
    cfg = dict(getattr(config, MIXERS[letter][2]))
    cfg.pop("layer", None)  # mamba_ssm's ssm_cfg["layer"] = "Mamba1" | "Mamba2" selects the class
    if letter == "A":
        cfg = normalize_attn_cfg(cfg)
    return cfg


def build_mixer(letter: str, config: ModelConfig, layer_idx: int, device=None, dtype=None) -> nn.Module:
    """The mixer for ``letter`` with ``d_model`` and the letter's config dict as keyword arguments."""
    cls = mixer_class(letter)
    kw = mixer_kwargs(letter, config)
    params = inspect.signature(cls.__init__).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, val in (("layer_idx", layer_idx), ("device", device), ("dtype", dtype)):
        if name in params or takes_var_kw:
            kw.setdefault(name, val)
    try:
        return cls(config.d_model, **kw)
    except TypeError as e:
        field = MIXERS[letter][2]
        raise ValueError(f"ModelConfig.{field} does not fit {cls.__name__}: {e}") from e


def build_norm(config: ModelConfig, device=None, dtype=None) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)


class Block(nn.Module):
    """``norm -> mixer -> +residual [-> norm2 -> mlp -> +residual]`` on the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.letter = config.layer_pattern[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = build_norm(config, device, dtype)
        self.mixer = build_mixer(self.letter, config, layer_idx, device, dtype)
        self.mlp_kind = config.layer_mlp(layer_idx)
        if self.mlp_kind != "none":
            self.norm2 = build_norm(config, device, dtype)
            if self.mlp_kind == "moe":
                m = config.moe_cfg
                self.mlp = MoE(config.d_model, int(m.get("d_expert", config.mlp_hidden)),
                               n_experts=int(m.get("n_experts", 8)), top_k=int(m.get("top_k", 2)),
                               normalize_top_k=bool(m.get("normalize_top_k", True)),
                               device=device, dtype=dtype)
            else:
                self.mlp = MLP(config.d_model, config.mlp_hidden, device=device, dtype=dtype)

    def _resid(self, h: torch.Tensor) -> torch.Tensor:
        return h.float() if self.residual_in_fp32 else h

    def _mlp(self, h: torch.Tensor, mask: torch.Tensor | None, dense: bool):
        x = self.norm2(h.to(self.norm2.weight.dtype))
        if self.mlp_kind == "moe":
            y, aux = self.mlp(x, mask=mask, dense=dense)
        else:
            y, aux = self.mlp(x), None
        return h + y, aux

    def forward(self, h: torch.Tensor, state: LayerState | None = None, return_state: bool = False,
                mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """``h: (batch, seqlen, d_model)`` residual stream -> ``(h, new_state or None, aux_loss or None)``."""
        h = self._resid(h)
        x = self.norm(h.to(self.norm.weight.dtype))
        kw = {}
        if mask is not None:
            kw["mask"] = mask
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        if state is not None or return_state:
            y, new_state = self.mixer(x, state=state, return_state=True, **kw)
        else:
            y, new_state = self.mixer(x, **kw), None
        h = h + y
        aux = None
        if self.mlp_kind != "none":
            h, aux = self._mlp(h, mask, dense=False)
        return h, new_state, aux

    def step(self, h: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token, ``h: (batch, d_model)``; updates ``state`` in place. Static shapes only."""
        h = self._resid(h)
        h = h + self.mixer.step(self.norm(h.to(self.norm.weight.dtype)), state)
        if self.mlp_kind != "none":
            h, _ = self._mlp(h, None, dense=True)
        return h

    def allocate_state(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> LayerState:
        if isinstance(self.mixer, Attention):
            return self.mixer.allocate_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen)
        return self.mixer.allocate_state(batch_size, device=device, dtype=dtype)
