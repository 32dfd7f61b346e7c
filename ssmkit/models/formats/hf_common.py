"""Pieces the Hugging Face hybrid formats share (Bamba, Granite 4.0-H, Nemotron-H).

Config: reading Hugging Face's spellings (legacy keys included), one ``ValueError`` naming the
field for a variant ssmkit does not implement. Weights: moving tensors between Hugging Face's
names and ssmkit's, joining separate projections into ssmkit's packed ones (attention's
``q_proj``/``k_proj``/``v_proj`` -> ``in_proj``; a gated MLP's up/gate -> ``fc1``) and splitting
them back. Joins and splits copy values, so a model saved and loaded again has the same tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ssmkit.models.config import ModelConfig

MAMBA2_GATED_NORM_EPS = 1e-5  # mamba_ssm's RMSNormGated default (ssmkit's Mamba2 default too)


def need(cfg: dict, key: str, family: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json (Hugging Face {family}) lacks the key {key!r}")
    return cfg[key]


def expect(cfg: dict, key: str, allowed: tuple, default: Any, family: str) -> Any:
    """``cfg[key]`` (or ``default``), which must be one of ``allowed``."""
    v = cfg.get(key, default)
    if v not in allowed:
        want = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"config.json {key}={v!r}: ssmkit's {family} supports {want} only")
    return v


def as_float(x: Any) -> float:
    """A JSON number; transformers writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(x, dict) and "__float__" in x:
        x = x["__float__"]
    return float(x)


def token_ids(cfg: dict) -> dict[str, Any]:
    out = {}
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = cfg.get(k)
        if isinstance(v, list):
            v = v[0] if v else None
        out[k] = v
    return out


def token_ids_out(config: ModelConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}


def rope_theta(cfg: dict, family: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older configs);
    scaled RoPE variants are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"config.json rope type {kind!r}: ssmkit's {family} supports plain RoPE "
                         "('default') only")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def mamba2_cfg(*, d_model: int, n_heads: int, head_dim: int, expand: Any, d_state: int, d_conv: int,
               n_groups: int, chunk_size: int, conv_bias: bool, bias: bool, limit: Any, norm_eps: float,
               dt_init: dict | None = None) -> dict[str, Any]:
    """``ModelConfig.mamba2_cfg`` of Hugging Face's Mamba-2 mixer settings. ``d_inner`` is
    ``n_heads * head_dim``; it is written only when it is not ``expand * d_model``."""
    d_inner = int(n_heads) * int(head_dim)
    if n_heads % n_groups:
        raise ValueError(f"config.json: the Mamba-2 groups ({n_groups}) must divide its heads ({n_heads})")
    lo, hi = (as_float(x) for x in (limit if limit is not None else (0.0, math.inf)))
    m2: dict[str, Any] = {"d_state": int(d_state), "d_conv": int(d_conv), "headdim": int(head_dim),
                          "ngroups": int(n_groups), "bias": bool(bias), "conv_bias": bool(conv_bias),
                          "chunk_size": int(chunk_size), "dt_limit": (lo, hi)}
    if isinstance(expand, int) and not isinstance(expand, bool) and expand * d_model == d_inner:
        m2["expand"] = expand
    else:
        m2["expand"], m2["d_inner"] = 2, d_inner
    if float(norm_eps) != MAMBA2_GATED_NORM_EPS:
        m2["norm_eps"] = float(norm_eps)
    m2.update(dt_init or {})
    return m2


def mamba2_cfg_of(cfg: dict, d_model: int, norm_eps: float) -> dict[str, Any]:
    """``ModelConfig.mamba2_cfg`` from the ``mamba_*`` keys of a Bamba / Granite 4.0-H config
    (``mamba_d_head`` "auto": ``mamba_expand * d_model / mamba_n_heads``)."""
    n_heads = int(cfg.get("mamba_n_heads", 128))
    expand = cfg.get("mamba_expand", 2)
    d_head = cfg.get("mamba_d_head", "auto")
    d_head = int(expand * d_model // n_heads) if d_head in ("auto", None) else int(d_head)
    return mamba2_cfg(d_model=d_model, n_heads=n_heads, head_dim=d_head, expand=expand,
                      d_state=int(cfg.get("mamba_d_state", 256)), d_conv=int(cfg.get("mamba_d_conv", 4)),
                      n_groups=int(cfg.get("mamba_n_groups", 1)), chunk_size=int(cfg.get("mamba_chunk_size", 256)),
                      conv_bias=bool(cfg.get("mamba_conv_bias", True)), bias=bool(cfg.get("mamba_proj_bias", False)),
                      limit=cfg.get("time_step_limit"), norm_eps=norm_eps)


def mamba2_fields(config: ModelConfig) -> tuple[dict[str, Any], str | None]:
    """The Mamba-2 settings of ``config`` (``n_heads``, ``head_dim``, ...) and why a Hugging Face
    hybrid cannot hold them (None if it can)."""
    c = dict(config.mamba2_cfg)
    c.pop("layer", None)
    for key, ok in (("rmsnorm", c.get("rmsnorm", True)), ("norm_before_gate", not c.get("norm_before_gate", False)),
                    ("D_has_hdim", not c.get("D_has_hdim", False))):
        if not ok:
            return {}, f"mamba2_cfg[{key!r}]={c.get(key)!r} (Hugging Face's hybrids have the mamba_ssm defaults)"
    extra = sorted(set(c) - {"d_state", "d_conv", "expand", "headdim", "ngroups", "bias", "conv_bias", "chunk_size",
                             "dt_limit", "dt_min", "dt_max", "dt_init_floor", "A_init_range", "d_inner",
                             "norm_eps", "rmsnorm", "norm_before_gate", "D_has_hdim"})
    if extra:
        return {}, f"mamba2_cfg keys {extra} have no Hugging Face equivalent"
    expand = c.get("expand", 2)
    d_inner = int(c.get("d_inner") or expand * config.d_model)
    headdim = int(c.get("headdim", 64))
    limit = c.get("dt_limit", (0.0, math.inf))
    return {"d_inner": d_inner, "expand": expand, "n_heads": d_inner // headdim, "head_dim": headdim,
            "d_state": int(c.get("d_state", 128)), "d_conv": int(c.get("d_conv", 4)),
            "n_groups": int(c.get("ngroups", 1)), "chunk_size": int(c.get("chunk_size", 256)),
            "conv_bias": bool(c.get("conv_bias", True)), "bias": bool(c.get("bias", False)),
            "limit": [float(limit[0]), float(limit[1])],
            "norm_eps": float(c.get("norm_eps", MAMBA2_GATED_NORM_EPS))}, None


def mlp_multipliers_why(config: ModelConfig) -> str | None:
    """Why ``config``'s MLPs cannot be written to an architecture without MLP multipliers."""
    scaled = [k for k in ("gate_multiplier", "down_multiplier") if config.mlp_cfg.get(k, 1.0) != 1.0]
    return f"mlp_cfg {scaled} (this architecture has no MLP multipliers)" if scaled else None


def mamba2_expand_why(config: ModelConfig) -> str | None:
    """Why ``config``'s Mamba-2 layers cannot be Bamba / Granite mixers (None if they can): those
    size d_inner as ``mamba_expand * hidden_size`` and use the model's ``rms_norm_eps`` in the
    gated norm."""
    m, why = mamba2_fields(config)
    if why:
        return why
    e = m["expand"]
    if not isinstance(e, int) or isinstance(e, bool) or e * config.d_model != m["d_inner"]:
        return f"Mamba-2 d_inner {m['d_inner']} is not an integer expand times d_model {config.d_model}"
    if m["norm_eps"] != config.norm_eps:
        return "the Mamba-2 gated norm uses the model's norm_eps"
    return None


def attention_fields(config: ModelConfig, key_multiplier: bool = False) -> tuple[dict[str, Any], str | None]:
    """Attention settings of ``config`` (heads, head_dim, rope_dim, bias, scale) and why a Hugging
    Face hybrid cannot hold them (None if it can). ``key_multiplier``: the family scales keys
    (Falcon-H1); otherwise an ``attn_cfg`` key multiplier is a reason."""
    from ssmkit.layers.attention import normalize_attn_cfg

    a = normalize_attn_cfg(dict(config.attn_cfg))
    n_heads = int(a.get("n_heads") or max(1, config.d_model // 64))
    n_kv = int(a.get("n_kv_heads") or n_heads)
    head_dim = int(a.get("head_dim") or config.d_model // n_heads)
    rope_dim = a.get("rope_dim")
    rope_dim = head_dim if rope_dim is None else int(rope_dim)
    if not key_multiplier and float(a.get("key_multiplier", 1.0)) != 1.0:
        return {}, "attn_cfg key_multiplier (this architecture does not scale keys)"
    if bool(a.get("qkv_bias", False)) != bool(a.get("out_bias", False)):
        return {}, "attn_cfg qkv_bias != out_bias (Hugging Face's attention_bias covers all four projections)"
    return {"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim, "rope_dim": rope_dim,
            "rope_theta": float(a.get("rope_theta", 10000.0)), "bias": bool(a.get("qkv_bias", False)),
            "softmax_scale": a.get("softmax_scale")}, None


# ------------------------------------------------------------------------------------------------
# Weights. ``src`` is consumed (moved tensors are popped), so what is left afterwards is what no
# rule knew: it is passed on unchanged and the loader names it as unexpected.
Tensors = dict[str, torch.Tensor]
_SUFFIXES = ("weight", "bias")


def move(src: Tensors, dst: Tensors, a: str, b: str) -> None:
    """``a.weight`` / ``a.bias`` (and ``a`` itself, for bare parameters) of ``src`` -> ``b...``."""
    if a in src:
        dst[b] = src.pop(a)
    for s in _SUFFIXES:
        if f"{a}.{s}" in src:
            dst[f"{b}.{s}"] = src.pop(f"{a}.{s}")


def move_prefix(src: Tensors, dst: Tensors, a: str, b: str) -> None:
    """Every tensor under ``a.`` -> the same name under ``b.``."""
    for k in [k for k in src if k.startswith(a + ".")]:
        dst[b + k[len(a):]] = src.pop(k)


def join(src: Tensors, dst: Tensors, parts: list[str], b: str) -> None:
    """``parts`` (weights, and biases where present) concatenated along dim 0 into ``b``."""
    for s in _SUFFIXES:
        keys = [f"{p}.{s}" for p in parts]
        if all(k in src for k in keys):
            dst[f"{b}.{s}"] = torch.cat([src.pop(k) for k in keys], dim=0)


def split(src: Tensors, dst: Tensors, a: str, parts: list[str], sizes: list[int]) -> None:
    """Inverse of :func:`join`: ``a`` cut along dim 0 into ``parts`` of ``sizes`` rows (copies)."""
    for s in _SUFFIXES:
        if f"{a}.{s}" in src:
            for p, t in zip(parts, src.pop(f"{a}.{s}").split(sizes, dim=0)):
                dst[f"{p}.{s}"] = t.clone()


def swap_halves(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``[x; y] -> [y; x]`` along ``dim`` (gate-first <-> value-first gated MLP weights)."""
    x, y = t.chunk(2, dim=dim)
    return torch.cat([y, x], dim=dim)


def attention_in(src: Tensors, dst: Tensors, a: str, b: str) -> None:
    """Hugging Face attention ``a.{q,k,v,o}_proj`` -> ssmkit's ``b.in_proj`` / ``b.out_proj``."""
    join(src, dst, [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], f"{b}.in_proj")
    move(src, dst, f"{a}.o_proj", f"{b}.out_proj")


def attention_out(src: Tensors, dst: Tensors, b: str, a: str, att: dict[str, Any]) -> None:
    q = att["n_heads"] * att["head_dim"]
    kv = att["n_kv_heads"] * att["head_dim"]
    split(src, dst, f"{b}.in_proj", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], [q, kv, kv])
    move(src, dst, f"{b}.out_proj", f"{a}.o_proj")


def gated_mlp_in(src: Tensors, dst: Tensors, gate: str, up: str, down: str, b: str) -> None:
    """Separate ``gate``/``up``/``down`` projections -> ssmkit's SwiGLU ``b.fc1`` ([up; gate]) and ``b.fc2``."""
    join(src, dst, [up, gate], f"{b}.fc1")
    move(src, dst, down, f"{b}.fc2")


def gated_mlp_out(src: Tensors, dst: Tensors, b: str, gate: str, up: str, down: str, hidden: int) -> None:
    split(src, dst, f"{b}.fc1", [up, gate], [hidden, hidden])
    move(src, dst, f"{b}.fc2", down)


def passthrough(src: Tensors, dst: Tensors) -> Tensors:
    """What no rule moved goes on under its own name (the loader reports it)."""
    dst.update(src)
    src.clear()
    return dst


def pop_any(src: dict, *keys: str) -> torch.Tensor | None:
    """The first of ``keys`` present in ``src``, removed from it (None if none is)."""
    for k in keys:
        if k in src:
            return src.pop(k)
    return None


def layers_in(src: dict, dst: dict, config: ModelConfig, *, final_norm: str, norm2: str):
    """Move the embedding, the final norm (``model.{final_norm}``), the head, and every layer's
    input norm, second norm (``{norm2}``) and mixer (``self_attn`` for attention, ``mamba``
    otherwise) from Hugging Face names to ssmkit's; yields ``(i, hf_prefix, ssmkit_prefix)`` per
    layer for the family's MLP part (Bamba, Granite 4.0-H, Jamba)."""
    move(src, dst, "model.embed_tokens", "backbone.embedding")
    move(src, dst, f"model.{final_norm}", "backbone.norm_f")
    move(src, dst, "lm_head", "lm_head")
    for i, letter in enumerate(config.layer_pattern):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        move(src, dst, f"{a}.input_layernorm", f"{b}.norm")
        move(src, dst, f"{a}.{norm2}", f"{b}.norm2")
        if letter == "A":
            attention_in(src, dst, f"{a}.self_attn", f"{b}.mixer")
        else:
            move_prefix(src, dst, f"{a}.mamba", f"{b}.mixer")
        yield i, a, b


def layers_out(src: dict, dst: dict, config: ModelConfig, *, final_norm: str, norm2: str):
    """The inverse of :func:`layers_in` (ssmkit names to Hugging Face's), yielding the same."""
    att, _ = attention_fields(config)
    move(src, dst, "backbone.embedding", "model.embed_tokens")
    move(src, dst, "backbone.norm_f", f"model.{final_norm}")
    move(src, dst, "lm_head", "lm_head")
    for i, letter in enumerate(config.layer_pattern):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        move(src, dst, f"{b}.norm", f"{a}.input_layernorm")
        move(src, dst, f"{b}.norm2", f"{a}.{norm2}")
        if letter == "A":
            attention_out(src, dst, f"{b}.mixer", f"{a}.self_attn", att)
        else:
            move_prefix(src, dst, f"{b}.mixer", f"{a}.mamba")
        yield i, a, b
