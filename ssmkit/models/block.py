"""One residual block of a language model and the factory that builds its mixer by letter.

Pre-norm residual (as ``mamba_ssm``'s ``Block``)::

    h = h + mixer(norm(h))
    h = h + mlp(norm2(h))        # only when the layer has an MLP (SwiGLU or MoE)

A layer that uses a shared block (``ModelConfig.shared_cfg``, :mod:`ssmkit.models.shared`) adds the
block's output ``t`` to the mixer's input only: ``h = h + mixer(norm(h + t))``.

The residual stream ``h`` is kept in float32 when ``residual_in_fp32`` (the norms' inputs are cast
to the weights' dtype first, as mamba_ssm does).

:class:`~ssmkit.LanguageModel` runs the blocks in the carried form ``(residual, out) ->
(residual, out)`` (:meth:`Block.forward_residual`, :meth:`Block.step_residual`): each add is
deferred to the next norm, so ``residual + out`` and the norm are one fused kernel
(:func:`ssmkit.ops.fused.norm.add_rms_norm`, Triton on CUDA without autograd) and the residual
stream is read and written once per norm. Same values as the unfused form.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ssmkit.layers.attention import Attention, normalize_attn_cfg
from ssmkit.layers.mlp import MLP
from ssmkit.layers.moe import MoE
from ssmkit.layers.norm import RMSNorm, ZeroCentredRMSNorm
from ssmkit.layers.state import LayerState
from ssmkit.models.config import LAYER_LETTERS, ModelConfig
from ssmkit.ops.dispatch import get
from ssmkit.ops.fused.norm import add_rms_norm_reference

# letter -> (module, class name, ModelConfig field with its kwargs). Imported lazily: a model only
# needs the mixers its pattern uses.
MIXERS: dict[str, tuple[str, str, str]] = {
    "M": ("ssmkit.layers.mamba", "Mamba", "ssm_cfg"),
    "2": ("ssmkit.layers.mamba2", "Mamba2", "mamba2_cfg"),
    "3": ("ssmkit.layers.mamba3", "Mamba3", "mamba3_cfg"),
    "A": ("ssmkit.layers.attention", "Attention", "attn_cfg"),
    "D": ("ssmkit.layers.delta_net", "DeltaNet", "deltanet_cfg"),
    "G": ("ssmkit.layers.delta_net", "GatedDeltaNet", "deltanet_cfg"),
    "S": ("ssmkit.layers.s4d", "S4D", "s4d_cfg"),
    "H": ("ssmkit.layers.h3", "H3", "h3_cfg"),
    "Y": ("ssmkit.layers.hyena", "Hyena", "hyena_cfg"),
    "F": ("ssmkit.layers.mlp", "FeedForward", "mlp_cfg"),
    "P": ("ssmkit.layers.parallel", "ParallelHybrid", "parallel_cfg"),
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
    if letter == "F":
        cfg["hidden"] = config.mlp_hidden
    if letter == "P":
        mamba = dict(config.mamba2_cfg)
        mamba.pop("layer", None)
        cfg.update(mamba=mamba, attn=normalize_attn_cfg(dict(config.attn_cfg)))
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
    if config.rms_norm and config.zero_centred_norm:
        return ZeroCentredRMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
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
        self.residual_multiplier = config.residual_multiplier
        self.norm = build_norm(config, device, dtype)
        self.mixer = build_mixer(self.letter, config, layer_idx, device, dtype)
        self.shared_use = None
        if config.shared_cfg:
            from ssmkit.models.shared import SharedUse, shared_layers

            uses = shared_layers(config)
            if layer_idx in uses:
                self.shared_use = SharedUse(config, uses.index(layer_idx), device, dtype)
        self.mlp_kind = config.layer_mlp(layer_idx)
        if self.mlp_kind != "none":
            self.norm2 = build_norm(config, device, dtype)
            act = config.mlp_cfg.get("activation", "swiglu")
            if self.mlp_kind == "moe":
                m = config.moe_cfg
                self.mlp = MoE(config.d_model, int(m.get("d_expert", config.mlp_hidden)),
                               n_experts=int(m.get("n_experts", 8)), top_k=int(m.get("top_k", 2)),
                               normalize_top_k=bool(m.get("normalize_top_k", True)),
                               d_shared=int(m.get("d_shared", 0)), activation=act,
                               shared_gate=bool(m.get("shared_gate", False)), device=device, dtype=dtype)
            else:
                mc = config.mlp_cfg
                self.mlp = MLP(config.d_model, config.mlp_hidden, bias=bool(mc.get("bias", False)), activation=act,
                               gate_multiplier=float(mc.get("gate_multiplier", 1.0)),
                               down_multiplier=float(mc.get("down_multiplier", 1.0)), device=device, dtype=dtype)

    def _add_norm(self, norm: nn.Module, out: torch.Tensor, residual: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + out`` (``out`` alone when ``residual`` is None) and its norm."""
        return add_norm(norm, out, residual, self.residual_in_fp32)

    def _mlp(self, x: torch.Tensor, mask: torch.Tensor | None, dense: bool):
        if self.mlp_kind == "moe":
            out, aux = self.mlp(x, mask=mask, dense=dense)
        else:
            out, aux = self.mlp(x), None
        return self._scale(out), aux

    def _scale(self, out: torch.Tensor) -> torch.Tensor:
        """A branch's output times ``residual_multiplier`` (before its residual add)."""
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def _shared_norm(self, out: torch.Tensor, residual: torch.Tensor | None, shared, state, return_state,
                     mask, cu_seqlens):
        """``(h, norm(h + t), new KV state)`` with ``h = residual + out`` and ``t`` this layer's use of
        its shared block (``shared = (block, embeddings)``)."""
        h = out if residual is None else residual + out
        if self.residual_in_fp32:
            h = h.float()
        block, emb = shared
        kv = state.shared if state is not None else None
        if kv is not None or return_state:
            t, new_kv = block(h, emb, self.shared_use, state=kv, return_state=True, mask=mask, cu_seqlens=cu_seqlens)
        else:
            t, new_kv = block(h, emb, self.shared_use, mask=mask, cu_seqlens=cu_seqlens), None
        return h, self.norm((h + t).to(self.norm.weight.dtype)), new_kv

    def forward_residual(self, residual: torch.Tensor | None, out: torch.Tensor,
                         state: LayerState | None = None, return_state: bool = False,
                         mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                         shared=None):
        """Carried form: ``(residual, out)`` -> ``(residual, out, new_state or None, aux or None)``.

        ``residual`` (None before the first block) plus ``out`` (the previous branch's output,
        or the embedding) is the block's input stream; the returned ``residual + out`` is its
        output stream. ``(batch, seqlen, d_model)`` each. ``shared``: ``(shared block, token
        embeddings)`` for a layer with a ``shared_use``.
        """
        new_kv = None
        if self.shared_use is not None:
            residual, x, new_kv = self._shared_norm(out, residual, shared, state, return_state, mask, cu_seqlens)
            state = state.layer if state is not None else None
        else:
            residual, x = self._add_norm(self.norm, out, residual)
        kw = {}
        if mask is not None:
            kw["mask"] = mask
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        if state is not None or return_state:
            out, new_state = self.mixer(x, state=state, return_state=True, **kw)
        else:
            out, new_state = self.mixer(x, **kw), None
        out = self._scale(out)
        if new_kv is not None:
            from ssmkit.models.shared import SharedUseState

            new_state = SharedUseState(new_state, new_kv)
        aux = None
        if self.mlp_kind != "none":
            residual, x = self._add_norm(self.norm2, out, residual)
            out, aux = self._mlp(x, mask, dense=False)
        return residual, out, new_state, aux

    def forward(self, h: torch.Tensor, state: LayerState | None = None, return_state: bool = False,
                mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """``h: (batch, seqlen, d_model)`` residual stream -> ``(h, new_state or None, aux_loss or None)``."""
        residual, out, new_state, aux = self.forward_residual(None, h, state, return_state, mask, cu_seqlens)
        return residual + out, new_state, aux

    def step_residual(self, residual: torch.Tensor | None, out: torch.Tensor, state: LayerState, shared=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Carried form of :meth:`step`: ``(residual, out)`` ``(batch, d_model)`` each -> the same
        for the next block; updates ``state`` in place. Static shapes only (CUDA-graph safe)."""
        fused = getattr(self.mixer, "can_step_norm", None)
        if self.shared_use is not None:
            h = out if residual is None else residual + out
            if self.residual_in_fp32:
                h = h.float()
            block, emb = shared
            t = block.step(h, emb, self.shared_use, state.shared)
            residual = h
            out = self.mixer.step(self.norm((h + t).to(self.norm.weight.dtype)), state.layer)
        elif fused is not None and isinstance(self.norm, RMSNorm) and fused(out):
            # add + norm inside the mixer's first GEMV (small-batch Triton decode)
            residual, out = self.mixer.step_norm(
                out, residual, self.norm.weight, self.norm.eps,
                torch.float32 if self.residual_in_fp32 else None, state)
        else:
            residual, x = self._add_norm(self.norm, out, residual)
            out = self.mixer.step(x, state)
        out = self._scale(out)
        if self.mlp_kind != "none":
            residual, x = self._add_norm(self.norm2, out, residual)
            out, _ = self._mlp(x, None, dense=True)
        return residual, out

    def step(self, h: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token, ``h: (batch, d_model)``; updates ``state`` in place. Static shapes only."""
        residual, out = self.step_residual(None, h, state)
        return residual + out

    def allocate_state(self, batch_size: int, max_seqlen: int, device=None, dtype=None, shared=None) -> LayerState:
        """The layer's state; with a ``shared_use``, with the KV cache of its use of ``shared`` (the
        shared block) too."""
        if (isinstance(self.mixer, Attention) or self.letter == "P"
                or "max_seqlen" in inspect.signature(self.mixer.allocate_state).parameters):  # KV / Hyena caches
            st = self.mixer.allocate_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen)
        else:
            st = self.mixer.allocate_state(batch_size, device=device, dtype=dtype)
        if self.shared_use is None:
            return st
        from ssmkit.models.shared import SharedUseState

        return SharedUseState(st, shared.allocate_state(batch_size, max_seqlen, device=device, dtype=dtype))


def add_norm(norm: nn.Module, out: torch.Tensor, residual: torch.Tensor | None,
             residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The deferred residual add and the next pre-norm: ``(residual + out, norm(residual + out))``.

    The sum is float32 when ``residual_in_fp32`` and is cast to the norm weight's dtype before the
    norm (as the unfused block does). RMSNorm goes through the fused op's Triton form when dispatch
    picks it (CUDA) and nothing needs gradients; otherwise PyTorch ops.
    """
    if isinstance(norm, RMSNorm):
        fused = get("add_rms_norm", "auto", out)
        if fused is not add_rms_norm_reference and not (torch.is_grad_enabled() and (
                out.requires_grad or norm.weight.requires_grad
                or (residual is not None and residual.requires_grad))):
            y, h = fused(out, residual, norm.weight, norm.eps, torch.float32 if residual_in_fp32 else None)
            return h, y
    h = out if residual is None else residual + out
    if residual_in_fp32:
        h = h.float()
    return h, norm(h.to(norm.weight.dtype))
