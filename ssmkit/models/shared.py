"""Shared attention blocks (Zamba / Zamba2): one set of parameters used at several depths.

``ModelConfig.shared_cfg`` adds ``n_blocks`` :class:`SharedBlock` modules (``backbone.shared_blocks.{k}``)
to a model. Layer ``i`` of ``shared_cfg["layers"]`` (its ``j``-th entry, the ``j``-th *use*) runs
shared block ``j % n_blocks`` before its own mixer::

    t = proj_i(shared_block(h, e))                  # e: the token embeddings (the model's input)
    h = h + mixer(norm(h + t))                      # t feeds the mixer only, not the residual stream

    shared_block(h, e):  x = norm([h; e])           # (..., 2 * d_model)
                         a = attention(x)           # 2 * d_model in, d_model out
                         y = mlp(norm2(a))          # gated MLP; no residual inside the block

Each use has its own unshared parts, :class:`SharedUse` (``backbone.layers.{i}.shared_use``): the
output projection ``proj`` (d_model -> d_model) and low-rank adapters (LoRA, ``x -> up(down(x))``,
added to a shared projection's output): on the MLP's first projection, and with ``attn_adapters``
on the attention's q, k and v. The shared block's parameters are one tensor each, used by every
use; the decoding cache gives every use its own KV cache (:class:`SharedUseState`: the layer's own
mixer state plus the shared attention's KV state of that use).

``shared_cfg`` keys: ``layers`` (layer indices, required), ``n_blocks`` (1), ``n_heads`` (required),
``n_kv_heads`` (``n_heads``), ``head_dim`` (``2 * d_model / n_heads``), ``rope_dim`` (0: no RoPE),
``rope_theta`` (10000), ``softmax_scale`` (None: ``1/sqrt(head_dim)``), ``d_intermediate``
(``4 * d_model``), ``activation`` ("geglu" or "swiglu"), ``bias`` (MLP biases, False),
``adapter_rank`` (0: no adapters), ``attn_adapters`` (False). The norms are RMSNorms with the
model's ``norm_eps``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ssmkit.layers.attention import Attention, KVCacheState
from ssmkit.layers.linear import Linear
from ssmkit.layers.mlp import MLP, gated
from ssmkit.layers.norm import RMSNorm
from ssmkit.layers.state import LayerState

_KEYS = {"layers", "n_blocks", "n_heads", "n_kv_heads", "head_dim", "rope_dim", "rope_theta", "softmax_scale",
         "d_intermediate", "activation", "bias", "adapter_rank", "attn_adapters"}


def check_shared_cfg(config) -> None:
    """Validate ``config.shared_cfg`` (a ``ValueError`` naming the key)."""
    sc = config.shared_cfg
    extra = sorted(set(sc) - _KEYS)
    if extra:
        raise ValueError(f"ModelConfig.shared_cfg has unknown keys {extra}; known keys: {sorted(_KEYS)}")
    layers = sc.get("layers")
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.n_layer
                         for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"ModelConfig.shared_cfg['layers'] must list distinct layer indices in "
                         f"[0, n_layer={config.n_layer}), got {layers!r}")
    n = sc.get("n_blocks", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(layers):
        raise ValueError(f"ModelConfig.shared_cfg['n_blocks'] must be an int in [1, {len(layers)}], got {n!r}")
    if not isinstance(sc.get("n_heads"), int) or sc["n_heads"] < 1:
        raise ValueError(f"ModelConfig.shared_cfg['n_heads'] must be a positive int, got {sc.get('n_heads')!r}")
    if sc.get("activation", "geglu") not in ("geglu", "swiglu"):
        raise ValueError(f"ModelConfig.shared_cfg['activation'] must be 'geglu' or 'swiglu', "
                         f"got {sc.get('activation')!r}")
    a = attention_kwargs(config)
    if a["n_heads"] % a["n_kv_heads"]:
        raise ValueError(f"ModelConfig.shared_cfg['n_kv_heads']={a['n_kv_heads']} must divide n_heads={a['n_heads']}")
    if sc.get("attn_adapters") and a["n_kv_heads"] != a["n_heads"]:
        raise ValueError("ModelConfig.shared_cfg['attn_adapters'] needs n_kv_heads == n_heads (the adapters "
                         "add to q, k and v alike)")


def attention_kwargs(config) -> dict[str, Any]:
    """The shared attention's settings with defaults filled in."""
    sc = config.shared_cfg
    n_heads = int(sc["n_heads"])
    head_dim = int(sc.get("head_dim") or 2 * config.d_model // n_heads)
    return {"n_heads": n_heads, "n_kv_heads": int(sc.get("n_kv_heads") or n_heads), "head_dim": head_dim,
            "rope_dim": int(sc.get("rope_dim", 0)), "rope_theta": float(sc.get("rope_theta", 10000.0)),
            "softmax_scale": sc.get("softmax_scale")}


def shared_layers(config) -> list[int]:
    """The layers that use a shared block, in use order."""
    return [int(i) for i in config.shared_cfg.get("layers", ())]


@dataclasses.dataclass
class SharedUseState(LayerState):
    """A layer's own mixer state (``layer``) and its use of the shared attention (``shared``)."""

    layer: LayerState
    shared: KVCacheState

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"layer.{k}": v for k, v in self.layer.tensors().items()},
                **{f"shared.{k}": v for k, v in self.shared.tensors().items()}}

    def clone(self):
        return SharedUseState(self.layer.clone(), self.shared.clone())

    def copy_(self, other: SharedUseState):
        self.layer.copy_(other.layer)
        self.shared.copy_(other.shared)
        return self

    def zero_(self):
        self.layer.zero_()
        self.shared.zero_()
        return self

    def index_select(self, index: torch.Tensor):
        return SharedUseState(self.layer.index_select(index), self.shared.index_select(index))

    def to(self, device):
        return SharedUseState(self.layer.to(device), self.shared.to(device))


class LoRA(nn.Module):
    """``x -> up(down(x))``: a rank-``rank`` adapter (no biases)."""

    def __init__(self, d_in: int, d_out: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.down = Linear(d_in, rank, bias=False, device=device, dtype=dtype)
        self.up = Linear(rank, d_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class SharedAttention(Attention):
    """Causal attention over ``[h; e]`` (``d_in`` channels) writing ``d_model`` channels, with
    per-call adapters added to q, k and v (the adapters of the use that calls it)."""

    def __init__(self, d_model: int, d_in: int, device=None, dtype=None, **kw):
        super().__init__(d_in, device=device, dtype=dtype, **kw)
        self.out_proj = Linear(self.n_heads * self.head_dim, d_model, bias=False, device=device, dtype=dtype)
        self._adapters: tuple[nn.Module, nn.Module, nn.Module] | None = None

    def _qkv(self, x: torch.Tensor):
        q, k, v = super()._qkv(x)
        if self._adapters is None:
            return q, k, v
        return tuple(t + f(x).unflatten(-1, t.shape[-2:]) for t, f in zip((q, k, v), self._adapters))

    def forward(self, x, adapters=None, **kw):
        self._adapters = adapters
        try:
            return super().forward(x, **kw)
        finally:
            self._adapters = None

    def step(self, x_t, state, adapters=None):
        self._adapters = adapters
        try:
            return super().step(x_t, state)
        finally:
            self._adapters = None


class SharedBlock(nn.Module):
    """``norm -> attention -> norm2 -> gated MLP`` on ``[h; e]`` (see the module docstring)."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        sc, d = config.shared_cfg, config.d_model
        self.norm = RMSNorm(2 * d, eps=config.norm_eps, device=device, dtype=dtype)
        self.attn = SharedAttention(d, 2 * d, device=device, dtype=dtype, **attention_kwargs(config))
        self.norm2 = RMSNorm(d, eps=config.norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(d, int(sc.get("d_intermediate") or 4 * d), bias=bool(sc.get("bias", False)),
                       activation=sc.get("activation", "geglu"), device=device, dtype=dtype)

    def _mlp(self, a: torch.Tensor, use: SharedUse) -> torch.Tensor:
        y = self.norm2(a)
        u = self.mlp.fc1(y)
        if use.mlp_lora is not None:
            u = u + use.mlp_lora(y)
        return use.proj(self.mlp.fc2(gated(u, self.mlp.activation)))

    def forward(self, h: torch.Tensor, emb: torch.Tensor, use: SharedUse, state: KVCacheState | None = None,
                return_state: bool = False, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        """``h, emb: (batch, seqlen, d_model)`` -> the use's contribution ``t`` (and the new KV state
        with ``return_state``)."""
        x = self.norm(torch.cat([h, emb.to(h.dtype)], dim=-1).to(self.norm.weight.dtype))
        kw = {"mask": mask} if mask is not None else {}
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        if state is not None or return_state:
            a, new_state = self.attn(x, adapters=use.attn_adapters(), state=state, return_state=True, **kw)
        else:
            a, new_state = self.attn(x, adapters=use.attn_adapters(), **kw), None
        t = self._mlp(a, use)
        return (t, new_state) if return_state else t

    def step(self, h: torch.Tensor, emb: torch.Tensor, use: SharedUse, state: KVCacheState) -> torch.Tensor:
        """One token: ``h, emb: (batch, d_model)``; updates ``state`` in place."""
        x = self.norm(torch.cat([h, emb.to(h.dtype)], dim=-1).to(self.norm.weight.dtype))
        return self._mlp(self.attn.step(x, state, adapters=use.attn_adapters()), use)

    def allocate_state(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> KVCacheState:
        return self.attn.allocate_state(batch_size, device=device, dtype=dtype, max_seqlen=max_seqlen)


class SharedUse(nn.Module):
    """The unshared parts of one use of a shared block: ``proj`` and the adapters. ``block``: the
    index of the shared block this use runs; ``index``: the use's place in ``shared_cfg["layers"]``."""

    def __init__(self, config, index: int, device=None, dtype=None):
        super().__init__()
        sc, d = config.shared_cfg, config.d_model
        self.index = index
        self.block = index % int(sc.get("n_blocks", 1))
        rank = int(sc.get("adapter_rank", 0))
        a = attention_kwargs(config)
        hidden = int(sc.get("d_intermediate") or 4 * d)
        self.proj = Linear(d, d, bias=False, device=device, dtype=dtype)
        self.mlp_lora = LoRA(d, 2 * hidden, rank, device, dtype) if rank else None
        if rank and sc.get("attn_adapters"):
            q, kv = a["n_heads"] * a["head_dim"], a["n_kv_heads"] * a["head_dim"]
            self.q_lora = LoRA(2 * d, q, rank, device, dtype)
            self.k_lora = LoRA(2 * d, kv, rank, device, dtype)
            self.v_lora = LoRA(2 * d, kv, rank, device, dtype)
        else:
            self.q_lora = self.k_lora = self.v_lora = None

    def attn_adapters(self):
        return None if self.q_lora is None else (self.q_lora, self.k_lora, self.v_lora)
