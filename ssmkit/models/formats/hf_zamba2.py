"""Hugging Face ``Zamba2ForCausalLM`` (Zyphra's Zamba2: Mamba-2 layers and shared attention blocks).

Every Zamba2 layer is a Mamba-2 block, ``h += mamba(norm(h))``. The ``hybrid`` layers first run a
shared transformer block on ``[h; embeddings]`` and add its projected output to the Mamba input
only: ``h += mamba(norm(h + linear(block(h, e))))``. There are ``num_mem_blocks`` shared blocks,
used in turn (ABAB...); each use has its own ``linear`` and LoRA adapters. In ssmkit that is
``layer_pattern`` ``"2" * n_layer`` with ``shared_cfg`` (:mod:`ssmkit.models.shared`): the shared
blocks are ``backbone.shared_blocks.{k}`` (one tensor per parameter, whatever the number of uses)
and each use's parts ``backbone.layers.{i}.shared_use``. Config keys map as::

    hidden_size -> d_model     num_hidden_layers -> n_layer     rms_norm_eps -> norm_eps
    layers_block_type ("mamba" / "linear_attention", "hybrid") -> shared_cfg layers (the hybrid ones)
    n_mamba_heads -> Mamba-2 heads (headdim = mamba_expand * hidden_size / n_mamba_heads)
    mamba_d_state / mamba_d_conv / mamba_ngroups / chunk_size -> d_state / d_conv / ngroups / chunk_size
    add_bias_linear -> Mamba-2 bias and shared_cfg bias (the shared MLP)
    time_step_min -> dt_limit (time_step_min, inf) and dt_min; time_step_max / floor -> dt_max / floor
    num_mem_blocks -> shared_cfg n_blocks    num_attention_heads / num_key_value_heads -> n_heads / n_kv_heads
    (head_dim = 2 * hidden_size / num_attention_heads, scale 1/sqrt(head_dim / 2))
    use_mem_rope, rope_parameters.rope_theta -> rope_dim (head_dim or 0), rope_theta
    intermediate_size -> shared_cfg d_intermediate    hidden_act "gelu" / "silu" -> activation "geglu" / "swiglu"
    adapter_rank -> adapter_rank    use_shared_attention_adapter -> attn_adapters

Weights: ``model.layers.{i}.mamba`` (``.mamba_decoder.mamba`` on hybrid layers) is ssmkit's
Mamba-2 mixer; the shared block ``k`` is stored once, under the ``k``-th hybrid layer's
``shared_transformer`` (transformers ties the later uses to it): ``q_proj``/``k_proj``/``v_proj``
are stacked into ``attn.in_proj``, ``gate_up_proj`` ``[gate; up]`` is ``mlp.fc1`` ``[up; gate]``.
The adapters of use ``j`` are entry ``j`` of the adapter lists of block ``j % num_mem_blocks``.
transformers 5.25 ties the later uses only when ``tie_word_embeddings`` is true; otherwise its
checkpoints hold a copy per use (and its models keep them apart). ssmkit reads such copies when
they equal the first (an error names the tensor otherwise) and writes them for such configs, so
transformers reads ssmkit's checkpoints with every use in place.

Sources: transformers 5.25 and Zyphra's original code (github.com/Zyphra/Zamba2) agree on the
block structure (no residual inside the shared block; the shared output enters the Mamba input,
not the residual stream). Where they differ ssmkit follows transformers, which is what reads the
published checkpoints: (1) the Mamba-2 conv always has a bias (transformers ignores
``use_conv_bias``); (2) Δ is clamped below at ``time_step_min`` (transformers' chunked form; its
single-token step and mamba_ssm's do not clamp, ssmkit clamps in both, so decoding matches the
full forward). ``use_long_context=True`` is refused: transformers 5.25 warns that it rescales
``rope_theta`` but does not, so the intended positions are unclear.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "zamba2"
FAMILY = "Zamba2"
_MAMBA = ("mamba", "linear_attention", "m")
_HYBRID = ("hybrid", "g")
_ACT = {"gelu": "geglu", "silu": "swiglu"}


def _hybrids(cfg: dict, n_layer: int) -> list[int]:
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    if kinds is None:  # transformers' default: the Zamba2-2.7B layout
        kinds = ["m"] + (["m"] * 5 + ["g"]) * 7 + ["m"] * 4 + ["g"] + ["m"] * 3 + ["g"] + ["m"] * 2
    bad = sorted({str(k) for k in kinds if k not in _MAMBA + _HYBRID})
    if bad:
        raise ValueError(f"config.json layers_block_type has unknown kinds {bad}; Zamba2 layers are 'mamba' "
                         "(or 'linear_attention') and 'hybrid'")
    if len(kinds) != n_layer:
        raise ValueError(f"config.json layers_block_type has {len(kinds)} entries but num_hidden_layers={n_layer}")
    return [i for i, k in enumerate(kinds) if k in _HYBRID]


def to_model_config(cfg: dict) -> ModelConfig:
    act = c.expect(cfg, "hidden_act", tuple(_ACT), "gelu", FAMILY)
    c.expect(cfg, "use_long_context", (False,), False, FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(cfg.get("num_hidden_layers", 54))
    hybrids = _hybrids(cfg, n_layer)
    if not hybrids:
        raise ValueError("config.json layers_block_type: a Zamba2 model needs at least one 'hybrid' layer")
    n_blocks = int(cfg.get("num_mem_blocks", 1))
    if not 1 <= n_blocks <= len(hybrids):
        raise ValueError(f"config.json num_mem_blocks={n_blocks} must lie in [1, {len(hybrids)}] (the hybrid layers)")
    heads = int(cfg.get("num_attention_heads", 32))
    kv = int(cfg.get("num_key_value_heads") or heads)
    if (2 * d_model) % heads:
        raise ValueError(f"config.json num_attention_heads={heads} must divide 2 * hidden_size = {2 * d_model}")
    head_dim = 2 * d_model // heads
    attn_adapters = bool(cfg.get("use_shared_attention_adapter", False))
    if attn_adapters and kv != heads:
        raise ValueError(f"config.json use_shared_attention_adapter=True needs num_key_value_heads ({kv}) == "
                         f"num_attention_heads ({heads})")
    expand = cfg.get("mamba_expand", 2)
    m_heads = int(cfg.get("n_mamba_heads", 8))
    if int(expand * d_model) % m_heads:
        raise ValueError(f"config.json n_mamba_heads={m_heads} must divide mamba_expand * hidden_size = "
                         f"{int(expand * d_model)}")
    bias = bool(cfg.get("add_bias_linear", False))
    dt_min = float(cfg.get("time_step_min", 0.001))
    m2 = c.mamba2_cfg(d_model=d_model, n_heads=m_heads, head_dim=int(expand * d_model) // m_heads, expand=expand,
                      d_state=int(cfg.get("mamba_d_state", 64)), d_conv=int(cfg.get("mamba_d_conv", 4)),
                      n_groups=int(cfg.get("mamba_ngroups", 1)), chunk_size=int(cfg.get("chunk_size", 256)),
                      conv_bias=True, bias=bias, limit=(dt_min, math.inf), norm_eps=c.MAMBA2_GATED_NORM_EPS,
                      dt_init={"dt_min": dt_min, "dt_max": float(cfg.get("time_step_max", 0.1)),
                               "dt_init_floor": float(cfg.get("time_step_floor", 1e-4))})
    shared: dict[str, Any] = {
        "layers": hybrids, "n_blocks": n_blocks, "n_heads": heads, "n_kv_heads": kv, "head_dim": head_dim,
        "rope_dim": head_dim if cfg.get("use_mem_rope") else 0, "softmax_scale": (head_dim / 2) ** -0.5,
        "d_intermediate": int(cfg.get("intermediate_size") or 4 * d_model), "activation": _ACT[act],
        "bias": bias, "adapter_rank": int(cfg.get("adapter_rank", 128)), "attn_adapters": attn_adapters}
    if cfg.get("use_mem_rope"):
        shared["rope_theta"] = c.rope_theta(cfg, FAMILY)
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(cfg.get("vocab_size", 32000)), pad_vocab_size_multiple=1,
        layer_pattern="2" * n_layer, mamba2_cfg=m2, shared_cfg=shared, mlp="none", rms_norm=True,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Zamba2 checkpoint (None if it can)."""
    if set(config.layer_pattern) != {"2"} or config.mlp != "none":
        return "Zamba2 layers are all Mamba-2 without MLP (layer_pattern of '2', mlp='none')"
    sc = config.shared_cfg
    if not sc:
        return "Zamba2 has shared attention blocks (shared_cfg)"
    if not config.rms_norm or (config.embedding_multiplier, config.residual_multiplier,
                               config.logits_scaling) != (1.0, 1.0, 1.0):
        return "Zamba2 uses RMSNorm and no embedding / residual / logits multipliers"
    m, why = c.mamba2_fields(config)
    if why:
        return why
    e = m["expand"]
    if not isinstance(e, int) or isinstance(e, bool) or e * config.d_model != m["d_inner"]:
        return f"Mamba-2 d_inner {m['d_inner']} is not an integer expand times d_model {config.d_model}"
    dt_min = float(config.mamba2_cfg.get("dt_min", 0.001))
    if m["norm_eps"] != c.MAMBA2_GATED_NORM_EPS or not m["conv_bias"] or m["limit"] != [dt_min, math.inf]:
        return "Zamba2's Mamba-2 has gated-norm eps 1e-5, a conv bias and dt_limit (dt_min, inf)"
    if bool(sc.get("bias", False)) != m["bias"]:
        return "Zamba2's add_bias_linear covers both the Mamba-2 projections and the shared MLP"
    from ssmkit.models.shared import attention_kwargs

    a = attention_kwargs(config)
    hd = a["head_dim"]
    if hd * a["n_heads"] != 2 * config.d_model or a["rope_dim"] not in (0, hd):
        return "Zamba2's shared attention has head_dim = 2 * d_model / n_heads and RoPE on all of it or none"
    if a["softmax_scale"] is None or not math.isclose(a["softmax_scale"], (hd / 2) ** -0.5, rel_tol=1e-12):
        return "Zamba2's shared attention scale is 1/sqrt(head_dim / 2)"
    if int(sc.get("adapter_rank", 0)) < 1:
        return "Zamba2's shared MLP has LoRA adapters (adapter_rank >= 1)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    from ssmkit.models.shared import attention_kwargs, shared_layers

    sc = config.shared_cfg
    hybrids = set(shared_layers(config))
    a = attention_kwargs(config)
    m, _ = c.mamba2_fields(config)
    mc = config.mamba2_cfg
    out: dict[str, Any] = {
        "architectures": ["Zamba2ForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "layers_block_type": ["hybrid" if i in hybrids else "mamba" for i in range(config.n_layer)],
        "mamba_d_state": m["d_state"], "mamba_d_conv": m["d_conv"], "mamba_expand": m["expand"],
        "mamba_ngroups": m["n_groups"], "n_mamba_heads": m["n_heads"], "chunk_size": m["chunk_size"],
        "use_conv_bias": True, "add_bias_linear": m["bias"], "time_step_min": mc.get("dt_min", 0.001),
        "time_step_max": mc.get("dt_max", 0.1), "time_step_floor": mc.get("dt_init_floor", 1e-4),
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"],
        "num_mem_blocks": int(sc.get("n_blocks", 1)), "adapter_rank": int(sc.get("adapter_rank", 0)),
        "use_shared_attention_adapter": bool(sc.get("attn_adapters", False)), "use_mem_rope": bool(a["rope_dim"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"]},
        "intermediate_size": int(sc.get("d_intermediate") or 4 * config.d_model),
        "hidden_act": {v: k for k, v in _ACT.items()}[sc.get("activation", "geglu")],
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "use_cache": True, **c.token_ids_out(config)}
    return out


def _names(config: ModelConfig):
    """The hybrid layers (in use order) and the number of shared blocks."""
    from ssmkit.models.shared import shared_layers

    ids = shared_layers(config)
    return ids, int(config.shared_cfg.get("n_blocks", 1))


def _mamba_prefix(i: int, hybrid: bool) -> str:
    return f"model.layers.{i}.mamba_decoder" if hybrid else f"model.layers.{i}"


def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    ids, n_blocks = _names(config)
    c.move(src, dst, "model.embed_tokens", "backbone.embedding")
    c.move(src, dst, "model.final_layernorm", "backbone.norm_f")
    c.move(src, dst, "lm_head", "lm_head")
    for i in range(config.n_layer):
        a, b = _mamba_prefix(i, i in ids), f"backbone.layers.{i}"
        c.move(src, dst, f"{a}.input_layernorm", f"{b}.norm")
        c.move_prefix(src, dst, f"{a}.mamba", f"{b}.mixer")
    for k in range(n_blocks):
        a, b = f"model.layers.{ids[k]}.shared_transformer", f"backbone.shared_blocks.{k}"
        c.move(src, dst, f"{a}.input_layernorm", f"{b}.norm")
        c.attention_in(src, dst, f"{a}.self_attn", f"{b}.attn")
        c.move(src, dst, f"{a}.pre_ff_layernorm", f"{b}.norm2")
        _move_swapped(src, dst, f"{a}.feed_forward.gate_up_proj", f"{b}.mlp.fc1")
        c.move(src, dst, f"{a}.feed_forward.down_proj", f"{b}.mlp.fc2")
    for j, i in enumerate(ids):
        a, b = f"model.layers.{ids[j % n_blocks]}.shared_transformer", f"backbone.layers.{i}.shared_use"
        c.move(src, dst, f"model.layers.{i}.linear", f"{b}.proj")
        lists = f"{a}.feed_forward.gate_up_proj_adapter_list.{j}"
        c.move(src, dst, f"{lists}.0", f"{b}.mlp_lora.down")
        _move_swapped(src, dst, f"{lists}.1", f"{b}.mlp_lora.up")
        for p in "qkv":
            c.move(src, dst, f"{a}.self_attn.linear_{p}_adapter_list.{j}.0", f"{b}.{p}_lora.down")
            c.move(src, dst, f"{a}.self_attn.linear_{p}_adapter_list.{j}.1", f"{b}.{p}_lora.up")
    for j in range(n_blocks, len(ids)):  # copies of a shared block under a later use
        a, first = f"model.layers.{ids[j]}.shared_transformer.", f"model.layers.{ids[j % n_blocks]}.shared_transformer."
        for key in [k for k in src if k.startswith(a)]:
            t, ref = src.pop(key), sd.get(first + key[len(a):])
            if ref is None or not torch.equal(t, ref):
                raise ValueError(f"checkpoint tensor {key} differs from {first + key[len(a):]}: this checkpoint's "
                                 "shared blocks are not shared (transformers leaves them untied when "
                                 "tie_word_embeddings is false), which ssmkit's Zamba2 cannot hold")
    return c.passthrough(src, dst)


def _move_swapped(src, dst, a: str, b: str) -> None:
    """``a`` -> ``b`` with the two halves of dim 0 exchanged ([gate; up] <-> [up; gate])."""
    for s in ("weight", "bias"):
        if f"{a}.{s}" in src:
            dst[f"{b}.{s}"] = c.swap_halves(src.pop(f"{a}.{s}"))


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    ids, n_blocks = _names(config)
    from ssmkit.models.shared import attention_kwargs

    a_kw = attention_kwargs(config)
    att = {"n_heads": a_kw["n_heads"], "n_kv_heads": a_kw["n_kv_heads"], "head_dim": a_kw["head_dim"]}
    c.move(src, dst, "backbone.embedding", "model.embed_tokens")
    c.move(src, dst, "backbone.norm_f", "model.final_layernorm")
    c.move(src, dst, "lm_head", "lm_head")
    for i in range(config.n_layer):
        a, b = _mamba_prefix(i, i in ids), f"backbone.layers.{i}"
        c.move(src, dst, f"{b}.norm", f"{a}.input_layernorm")
        c.move_prefix(src, dst, f"{b}.mixer", f"{a}.mamba")
    for k in range(n_blocks):
        a, b = f"model.layers.{ids[k]}.shared_transformer", f"backbone.shared_blocks.{k}"
        c.move(src, dst, f"{b}.norm", f"{a}.input_layernorm")
        c.attention_out(src, dst, f"{b}.attn", f"{a}.self_attn", att)
        c.move(src, dst, f"{b}.norm2", f"{a}.pre_ff_layernorm")
        _move_swapped(src, dst, f"{b}.mlp.fc1", f"{a}.feed_forward.gate_up_proj")
        c.move(src, dst, f"{b}.mlp.fc2", f"{a}.feed_forward.down_proj")
    for j, i in enumerate(ids):
        a, b = f"model.layers.{ids[j % n_blocks]}.shared_transformer", f"backbone.layers.{i}.shared_use"
        c.move(src, dst, f"{b}.proj", f"model.layers.{i}.linear")
        lists = f"{a}.feed_forward.gate_up_proj_adapter_list.{j}"
        c.move(src, dst, f"{b}.mlp_lora.down", f"{lists}.0")
        _move_swapped(src, dst, f"{b}.mlp_lora.up", f"{lists}.1")
        for p in "qkv":
            c.move(src, dst, f"{b}.{p}_lora.down", f"{a}.self_attn.linear_{p}_adapter_list.{j}.0")
            c.move(src, dst, f"{b}.{p}_lora.up", f"{a}.self_attn.linear_{p}_adapter_list.{j}.1")
    if not config.tie_embeddings:  # transformers then does not tie the shared blocks: write every use's copy
        for j in range(n_blocks, len(ids)):
            first = f"model.layers.{ids[j % n_blocks]}.shared_transformer."
            for key in [k for k in dst if k.startswith(first)]:
                dst[f"model.layers.{ids[j]}.shared_transformer." + key[len(first):]] = dst[key].clone()
    return c.passthrough(src, dst)
