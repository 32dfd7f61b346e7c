"""Hugging Face ``FalconH1ForCausalLM`` (TII's Falcon-H1: Mamba-2 and attention in parallel in every
layer, a SwiGLU MLP after them, and µP multipliers).

A Falcon-H1 layer is ssmkit's block with the mixer ``P`` (:class:`~ssmkit.layers.parallel.ParallelHybrid`)::

    x = input_layernorm(h)
    h += ssm_out_multiplier * mamba(x) + attention_out_multiplier * attention(attention_in_multiplier * x)
    h += down_multiplier * down_proj(up_proj(x') * silu(gate_multiplier * gate_proj(x')))   x' = pre_ff_layernorm(h)

with the embedding output times ``embedding_multiplier`` and the logits times ``lm_head_multiplier``.
Config keys map as::

    hidden_size -> d_model   num_hidden_layers -> n_layer ("P" * n)   rms_norm_eps -> norm_eps
    num_attention_heads / num_key_value_heads / head_dim -> attn_cfg (RoPE on whole heads;
        rope_parameters.rope_theta -> rope_theta)    key_multiplier -> attn_cfg key_multiplier
    attention_bias -> attn_cfg qkv_bias and out_bias
    mamba_d_ssm (else mamba_expand * hidden_size) -> Mamba-2 d_inner   mamba_n_heads, mamba_d_head,
        mamba_d_state, mamba_d_conv, mamba_n_groups, mamba_chunk_size, mamba_conv_bias, time_step_limit
    mamba_proj_bias and projectors_bias -> Mamba-2 bias (in_proj and out_proj: they must agree)
    mamba_rms_norm -> rmsnorm (False: y * silu(z), no gated norm)   mamba_norm_before_gate -> norm_before_gate
    ssm_in_multiplier -> mamba2_cfg in_multiplier    ssm_multipliers -> mamba2_cfg in_proj_multipliers
    attention_in_multiplier / attention_out_multiplier / ssm_out_multiplier -> parallel_cfg
    intermediate_size -> d_intermediate   mlp_multipliers -> mlp_cfg gate_multiplier, down_multiplier
    mlp_bias -> mlp_cfg bias     embedding_multiplier -> embedding_multiplier
    lm_head_multiplier -> logits_scaling = 1 / lm_head_multiplier

Weights: ``model.layers.{i}.mamba.*`` are ssmkit's Mamba-2 names under ``backbone.layers.{i}.mixer.mamba``;
``self_attn.{q,k,v}_proj`` are stacked into ``mixer.attn.in_proj``, ``o_proj`` is ``mixer.attn.out_proj``;
``feed_forward``'s ``[up_proj; gate_proj]`` is ``mlp.fc1`` and ``down_proj`` is ``mlp.fc2``;
``input_layernorm`` / ``pre_ff_layernorm`` / ``model.final_layernorm`` are ``norm`` / ``norm2`` / ``norm_f``.

Sources: transformers 5.25 and the original Falcon-H1 code (TII's, on mamba_ssm's Mamba-2 kernels)
agree on every published checkpoint, which have ``mamba_norm_before_gate: false``. With
``mamba_rms_norm`` and ``mamba_norm_before_gate`` both true they differ: transformers' PyTorch path
normalises before the gate, its fused training kernel (as mamba_ssm) after; ssmkit follows the
config (as transformers' inference does). The logits are divided by ``1 / lm_head_multiplier``
where transformers multiplies: float32 rounding apart, the same values.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "falcon_h1"
FAMILY = "Falcon-H1"
_ONE = 1.0


def _mults(cfg: dict, key: str, n: int) -> tuple[float, ...]:
    v = cfg.get(key)
    if v is None:
        return (1.0,) * n
    v = tuple(float(x) for x in v)
    if len(v) != n:
        raise ValueError(f"config.json {key}={list(v)}: Falcon-H1 needs {n} numbers")
    return v


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "hidden_act", ("silu",), "silu", FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(c.need(cfg, "num_hidden_layers", FAMILY))
    n_heads = int(cfg.get("num_attention_heads", 32))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or d_model // n_heads)
    if float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json rope_parameters.partial_rotary_factor: Falcon-H1 rotates whole heads")
    proj_bias = bool(cfg.get("mamba_proj_bias", False))
    if bool(cfg.get("projectors_bias", False)) != proj_bias:
        raise ValueError(f"config.json projectors_bias={cfg.get('projectors_bias')!r} with mamba_proj_bias="
                         f"{proj_bias!r}: ssmkit's Mamba-2 has biases on both projections or neither")
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    expand = cfg.get("mamba_expand", 2)
    d_ssm = cfg.get("mamba_d_ssm")
    d_inner = int(expand * d_model) if d_ssm is None else int(d_ssm)
    mamba_heads = int(cfg.get("mamba_n_heads", 128))
    d_head = cfg.get("mamba_d_head", "auto")
    d_head = d_inner // mamba_heads if d_head in ("auto", None) else int(d_head)
    if d_head * mamba_heads != d_inner:
        raise ValueError(f"config.json mamba_n_heads={mamba_heads} x mamba_d_head={d_head} must equal the Mamba-2 "
                         f"width mamba_d_ssm (or mamba_expand * hidden_size) = {d_inner}")
    m2 = c.mamba2_cfg(d_model=d_model, n_heads=mamba_heads, head_dim=d_head, expand=expand,
                      d_state=int(cfg.get("mamba_d_state", 256)), d_conv=int(cfg.get("mamba_d_conv", 4)),
                      n_groups=int(cfg.get("mamba_n_groups", 1)), chunk_size=int(cfg.get("mamba_chunk_size", 256)),
                      conv_bias=bool(cfg.get("mamba_conv_bias", True)), bias=proj_bias,
                      limit=cfg.get("time_step_limit"), norm_eps=eps)
    if not cfg.get("mamba_rms_norm", False):
        m2["rmsnorm"] = False
    elif cfg.get("mamba_norm_before_gate", True):
        m2["norm_before_gate"] = True
    ssm_in = float(cfg.get("ssm_in_multiplier", 1.0))
    if ssm_in != _ONE:
        m2["in_multiplier"] = ssm_in
    mup = _mults(cfg, "ssm_multipliers", 5)
    if mup != (1.0,) * 5:
        m2["in_proj_multipliers"] = mup
    bias = bool(cfg.get("attention_bias", False))
    attn = {"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim, "rope_theta": c.rope_theta(cfg, FAMILY),
            "qkv_bias": bias, "out_bias": bias}
    if float(cfg.get("key_multiplier", 1.0)) != _ONE:
        attn["key_multiplier"] = float(cfg["key_multiplier"])
    gate_m, down_m = _mults(cfg, "mlp_multipliers", 2)
    mlp_cfg: dict[str, Any] = {k: v for k, v in (("gate_multiplier", gate_m), ("down_multiplier", down_m)) if v != _ONE}
    if cfg.get("mlp_bias"):
        mlp_cfg["bias"] = True
    par = {k: float(cfg.get(src, 1.0)) for k, src in (("attn_in_multiplier", "attention_in_multiplier"),
                                                      ("attn_out_multiplier", "attention_out_multiplier"),
                                                      ("ssm_out_multiplier", "ssm_out_multiplier"))}
    lm_mult = float(cfg.get("lm_head_multiplier", 1.0))
    if lm_mult == 0:
        raise ValueError("config.json lm_head_multiplier=0: the logits would all be 0")
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern="P" * n_layer, mamba2_cfg=m2, attn_cfg=attn,
        parallel_cfg={k: v for k, v in par.items() if v != _ONE},
        mlp="swiglu", d_intermediate=int(cfg.get("intermediate_size", 14336)), mlp_cfg=mlp_cfg,
        rms_norm=True, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        logits_scaling=1.0 / lm_mult if lm_mult != _ONE else 1.0,
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Falcon-H1 checkpoint (None if it can)."""
    if set(config.layer_pattern) != {"P"}:
        return f"layer_pattern {config.layer_pattern!r}: every Falcon-H1 layer is Mamba-2 + attention (P)"
    if config.mlp != "swiglu" or config.mlp_cfg.get("activation", "swiglu") != "swiglu":
        return "Falcon-H1 has a SwiGLU MLP in every layer (mlp='swiglu')"
    if not config.rms_norm:
        return "Falcon-H1 uses RMSNorm"
    if config.residual_multiplier != 1.0:
        return "Falcon-H1 has no residual_multiplier (its branches carry their own multipliers)"
    mc = dict(config.mamba2_cfg)
    for key in ("in_multiplier", "in_proj_multipliers", "rmsnorm", "norm_before_gate"):
        mc.pop(key, None)
    m, why = c.mamba2_fields(ModelConfig(d_model=config.d_model, n_layer=1, vocab_size=1, mamba2_cfg=mc))
    if why:
        return why
    if m["norm_eps"] != config.norm_eps:
        return "Falcon-H1's Mamba-2 gated norm uses the model's norm_eps"
    if config.mamba2_cfg.get("D_has_hdim", False):
        return "Falcon-H1's Mamba-2 has one D per head"
    a, why = c.attention_fields(config, key_multiplier=True)
    if why:
        return why
    if a["rope_dim"] != a["head_dim"] or a["softmax_scale"] is not None:
        return "Falcon-H1's attention rotates whole heads (rope_dim = head_dim) with scale 1/sqrt(head_dim)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    a, _ = c.attention_fields(config, key_multiplier=True)
    mc = config.mamba2_cfg
    m, _ = c.mamba2_fields(ModelConfig(d_model=config.d_model, n_layer=1, vocab_size=1, mamba2_cfg={
        k: v for k, v in mc.items() if k not in ("in_multiplier", "in_proj_multipliers", "rmsnorm", "norm_before_gate")}))
    pc, lc = config.parallel_cfg, config.mlp_cfg
    return {
        "architectures": ["FalconH1ForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "intermediate_size": config.mlp_hidden, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "mlp_bias": bool(lc.get("bias", False)), "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "use_cache": True,
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"], "head_dim": a["head_dim"],
        "attention_bias": a["bias"], "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"]},
        "key_multiplier": float(config.attn_cfg.get("key_multiplier", 1.0)),
        "mamba_d_ssm": m["d_inner"], "mamba_n_heads": m["n_heads"], "mamba_d_head": m["head_dim"],
        "mamba_expand": m["expand"], "mamba_d_state": m["d_state"], "mamba_d_conv": m["d_conv"],
        "mamba_n_groups": m["n_groups"], "mamba_chunk_size": m["chunk_size"], "mamba_conv_bias": m["conv_bias"],
        "mamba_proj_bias": m["bias"], "projectors_bias": m["bias"], "time_step_limit": m["limit"],
        "mamba_rms_norm": bool(mc.get("rmsnorm", True)), "mamba_norm_before_gate": bool(mc.get("norm_before_gate", False)),
        "ssm_in_multiplier": float(mc.get("in_multiplier", 1.0)),
        "ssm_multipliers": list(mc.get("in_proj_multipliers") or (1.0,) * 5),
        "attention_in_multiplier": float(pc.get("attn_in_multiplier", 1.0)),
        "attention_out_multiplier": float(pc.get("attn_out_multiplier", 1.0)),
        "ssm_out_multiplier": float(pc.get("ssm_out_multiplier", 1.0)),
        "mlp_multipliers": [float(lc.get("gate_multiplier", 1.0)), float(lc.get("down_multiplier", 1.0))],
        "embedding_multiplier": config.embedding_multiplier,
        "lm_head_multiplier": 1.0 / config.logits_scaling, **c.token_ids_out(config)}


def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    c.move(src, dst, "model.embed_tokens", "backbone.embedding")
    c.move(src, dst, "model.final_layernorm", "backbone.norm_f")
    c.move(src, dst, "lm_head", "lm_head")
    for i in range(config.n_layer):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        c.move(src, dst, f"{a}.input_layernorm", f"{b}.norm")
        c.move(src, dst, f"{a}.pre_ff_layernorm", f"{b}.norm2")
        c.attention_in(src, dst, f"{a}.self_attn", f"{b}.mixer.attn")
        c.move_prefix(src, dst, f"{a}.mamba", f"{b}.mixer.mamba")
        c.gated_mlp_in(src, dst, f"{a}.feed_forward.gate_proj", f"{a}.feed_forward.up_proj",
                       f"{a}.feed_forward.down_proj", f"{b}.mlp")
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    att, _ = c.attention_fields(config, key_multiplier=True)
    c.move(src, dst, "backbone.embedding", "model.embed_tokens")
    c.move(src, dst, "backbone.norm_f", "model.final_layernorm")
    c.move(src, dst, "lm_head", "lm_head")
    for i in range(config.n_layer):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        c.move(src, dst, f"{b}.norm", f"{a}.input_layernorm")
        c.move(src, dst, f"{b}.norm2", f"{a}.pre_ff_layernorm")
        c.attention_out(src, dst, f"{b}.mixer.attn", f"{a}.self_attn", att)
        c.move_prefix(src, dst, f"{b}.mixer.mamba", f"{a}.mamba")
        c.gated_mlp_out(src, dst, f"{b}.mlp", f"{a}.feed_forward.gate_proj", f"{a}.feed_forward.up_proj",
                        f"{a}.feed_forward.down_proj", config.mlp_hidden)
    return c.passthrough(src, dst)
