"""Hugging Face ``Qwen3NextForCausalLM`` (Qwen3-Next: Gated DeltaNet layers with a gated full
attention layer every few layers, and a mixture of experts with a gated shared expert).

A Qwen3-Next layer is ssmkit's pre-norm block: ``h += mixer(input_layernorm(h))``, then
``h += mlp(post_attention_layernorm(h))``. Every RMSNorm of the residual stream (and the q/k norms)
stores its weight as the offset from 1 (``ModelConfig.zero_centred_norm``,
:class:`~ssmkit.layers.norm.ZeroCentredRMSNorm`), so the tensors are taken as they are. Config
keys map as::

    layer_types "linear_attention" / "full_attention" -> layer_pattern "G" / "A"
        (or full_attention_interval k: layers k-1, 2k-1, ... are attention)
    linear_num_key_heads -> deltanet_cfg num_heads     linear_num_value_heads -> num_v_heads
    linear_key_head_dim -> head_dim    linear_value_head_dim / linear_key_head_dim -> expand_v
    linear_conv_kernel_dim -> conv_size (no conv bias)    rms_norm_eps -> norm_eps (all norms)
    num_attention_heads, num_key_value_heads, head_dim -> attn_cfg n_heads, n_kv_heads, head_dim
    rope_parameters rope_theta, partial_rotary_factor -> attn_cfg rope_theta, rope_dim
    (attention: qk_norm="zero_centred_rms", output_gate=True)   attention_bias -> qkv_bias, out_bias
    num_experts > 0 -> mlp="moe" on every layer: moe_cfg n_experts, top_k (num_experts_per_tok),
        d_expert (moe_intermediate_size), d_shared (shared_expert_intermediate_size), shared_gate=True,
        normalize_top_k (norm_topk_prob)
    num_experts == 0 -> mlp="swiglu" with d_intermediate = intermediate_size

Covered: every layer MoE (``decoder_sparse_step`` 1, no ``mlp_only_layers``) or every layer dense;
plain (unscaled) RoPE. Other variants are refused naming the field.

Weights. The linear-attention projections are packed per key head in the checkpoint:
``in_proj_qkvz`` holds, for each key head, ``[q (K); k (K); v (r V); z (r V)]`` with
``r = num_v_heads / num_k_heads``, and ``in_proj_ba`` ``[b (r); a (r)]``; they are cut into ssmkit's
``q_proj``, ``k_proj``, ``v_proj``, ``g_proj`` (z), ``b_proj``, ``a_proj`` and packed back on save.
The attention ``q_proj`` holds per head ``[q (D); gate (D)]``; ssmkit's ``in_proj`` is
``[q; gate; k; v]``. Experts are written one by one (``mlp.experts.{e}.{gate,up,down}_proj``, as the
published checkpoints store them); transformers 5's in-memory ``experts.gate_up_proj`` /
``down_proj`` load too. The multi-token-prediction head of the published checkpoints (``mtp.*``)
is not part of the causal LM (transformers skips it too) and is dropped on load.

transformers is the reference followed here (Qwen's own release of the architecture is its
transformers implementation; the published configs and checkpoints are written for it). Where
ssmkit differs from it: padding. transformers zeroes the hidden states of padded tokens before the
linear-attention projections but still applies their decay (``g`` of a zero input is not zero);
ssmkit leaves the state untouched at padding (β = 0, g = 0), as for every native mixer. With left
padding the state is still zero there, so the two agree token for token (tested); with right or
inner padding ssmkit gives what the row alone gives. In bfloat16 the gated output norm rounds once
(float32 inside) where transformers rounds the normalised value before the weight and gate.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "qwen3_next"
FAMILY = "Qwen3-Next"
_KINDS = {"linear_attention": "G", "full_attention": "A"}


def _layer_types(cfg: dict, n_layer: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        k = int(cfg.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n_layer)]
    bad = sorted({t for t in types if t not in _KINDS})
    if bad or len(types) != n_layer:
        raise ValueError(f"config.json layer_types must list num_hidden_layers={n_layer} of 'linear_attention' / "
                         f"'full_attention', got {len(types)} with {bad or 'no'} unknown kinds")
    return list(types)


def _rope_dim(cfg: dict, head_dim: int) -> int:
    params = cfg.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    dim = int(head_dim * factor)
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(f"config.json partial_rotary_factor={factor}: head_dim * factor must be an even "
                         f"number of channels in (0, head_dim={head_dim}], got {dim}")
    return dim


def _mlp(cfg: dict, n_layer: int) -> dict[str, Any]:
    n_exp = int(cfg.get("num_experts") or 0)
    if not n_exp:
        return {"mlp": "swiglu", "d_intermediate": int(c.need(cfg, "intermediate_size", FAMILY))}
    if int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ValueError(f"config.json decoder_sparse_step={cfg['decoder_sparse_step']}: ssmkit's {FAMILY} "
                         "supports a mixture of experts on every layer (1) only")
    if cfg.get("mlp_only_layers"):
        raise ValueError(f"config.json mlp_only_layers={cfg['mlp_only_layers']}: ssmkit's {FAMILY} supports "
                         "a mixture of experts on every layer (no dense-MLP layers) only")
    shared = int(cfg.get("shared_expert_intermediate_size", 512))
    if shared <= 0:
        raise ValueError(f"config.json shared_expert_intermediate_size={shared}: {FAMILY} has a shared expert")
    return {"mlp": "moe", "d_intermediate": int(cfg.get("intermediate_size", 5632)),
            "moe_cfg": {"n_experts": n_exp, "top_k": int(cfg.get("num_experts_per_tok", 10)), "every": 1,
                        "d_expert": int(cfg.get("moe_intermediate_size", 512)), "d_shared": shared,
                        "shared_gate": True, "normalize_top_k": bool(cfg.get("norm_topk_prob", True))}}


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "hidden_act", ("silu",), "silu", FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(c.need(cfg, "num_hidden_layers", FAMILY))
    types = _layer_types(cfg, n_layer)
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    n_heads = int(cfg.get("num_attention_heads", 16))
    head_dim = int(cfg.get("head_dim") or d_model // n_heads)
    bias = bool(cfg.get("attention_bias", False))
    attn = {"n_heads": n_heads, "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads), "head_dim": head_dim,
            "rope_dim": _rope_dim(cfg, head_dim), "rope_theta": c.rope_theta(cfg, FAMILY), "qkv_bias": bias,
            "out_bias": bias, "qk_norm": "zero_centred_rms", "qk_norm_eps": eps, "output_gate": True}
    hk, hv = int(cfg.get("linear_num_key_heads", 16)), int(cfg.get("linear_num_value_heads", 32))
    if hv % hk:
        raise ValueError(f"config.json linear_num_value_heads={hv} must be a multiple of linear_num_key_heads={hk}")
    dk, dv = int(cfg.get("linear_key_head_dim", 128)), int(cfg.get("linear_value_head_dim", 128))
    expand_v = dv // dk if dv % dk == 0 else dv / dk
    delta = {"num_heads": hk, "num_v_heads": hv, "head_dim": dk, "expand_v": expand_v,
             "conv_size": int(cfg.get("linear_conv_kernel_dim", 4)), "conv_bias": False, "norm_eps": eps,
             "use_output_gate": True}
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern="".join(_KINDS[t] for t in types), attn_cfg=attn,
        deltanet_cfg=delta, **_mlp(cfg, n_layer), rms_norm=True, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        zero_centred_norm=True, **c.token_ids(cfg))


def _delta_fields(config: ModelConfig) -> tuple[dict[str, Any], str | None]:
    d = dict(config.deltanet_cfg)
    hk = int(d.get("num_heads", 4))
    hv = int(d.get("num_v_heads") or hk)
    dk = int(d.get("head_dim") or config.d_model // hk)
    dv = dk * d.get("expand_v", 2.0)
    if dv != int(dv):
        return {}, "Gated DeltaNet value size head_dim * expand_v is not an integer"
    if d.get("conv_bias", False) or not d.get("use_output_gate", True):
        return {}, f"{FAMILY}'s Gated DeltaNet has no conv bias and an output gate"
    if float(d.get("norm_eps", 1e-5)) != config.norm_eps:
        return {}, f"{FAMILY}'s Gated DeltaNet output norm uses the model's norm_eps"
    return {"hk": hk, "hv": hv, "dk": dk, "dv": int(dv), "conv": int(d.get("conv_size", 4))}, None


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Qwen3-Next checkpoint (None if it can)."""
    pat = config.layer_pattern
    if not set(pat) <= {"G", "A"}:
        return f"layer_pattern {pat!r}: {FAMILY} layers are Gated DeltaNet (G) or attention (A)"
    if not (config.rms_norm and config.zero_centred_norm):
        return f"{FAMILY} uses zero-centred RMSNorms (zero_centred_norm=True)"
    if config.mlp_cfg.get("activation", "swiglu") != "swiglu" or config.mlp_cfg.get("bias", False):
        return f"{FAMILY}'s MLPs are SwiGLU without biases"
    if c.mlp_multipliers_why(config):
        return c.mlp_multipliers_why(config)
    if (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) != (1.0, 1.0, 1.0):
        return f"{FAMILY} has no embedding / residual / logits multipliers"
    if config.mlp == "moe":
        m = config.moe_cfg
        if config.moe_layers() != list(range(config.n_layer)):
            return f"{FAMILY} has its mixture of experts on every layer"
        if not int(m.get("d_shared", 0)) or not m.get("shared_gate", False):
            return f"{FAMILY}'s mixture of experts has a gated shared expert (moe_cfg d_shared, shared_gate)"
    elif config.mlp != "swiglu":
        return f"{FAMILY} has an MLP in every layer (mlp='swiglu' or 'moe')"
    if "G" in pat:
        _, why = _delta_fields(config)
        if why:
            return why
    if "A" in pat:
        a, why = c.attention_fields(config)
        if why:
            return why
        ac = config.attn_cfg
        if ac.get("qk_norm") != "zero_centred_rms" or not ac.get("output_gate", False):
            return f"{FAMILY}'s attention has zero-centred q/k norms and an output gate"
        if float(ac.get("qk_norm_eps", 1e-6)) != config.norm_eps or a["softmax_scale"] is not None:
            return f"{FAMILY}'s attention uses the model's norm_eps for q/k and the default softmax scale"
        if not a["rope_dim"]:
            return f"{FAMILY} rotates part of each head (rope_dim > 0)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    a, _ = c.attention_fields(config)
    d, _ = _delta_fields(config)
    out: dict[str, Any] = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": MODEL_TYPE,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "use_cache": True,
        "layer_types": ["full_attention" if ch == "A" else "linear_attention" for ch in config.layer_pattern],
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"], "head_dim": a["head_dim"],
        "attention_bias": a["bias"],
        "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"],
                            "partial_rotary_factor": a["rope_dim"] / a["head_dim"]},
        "linear_num_key_heads": d.get("hk", 16), "linear_num_value_heads": d.get("hv", 32),
        "linear_key_head_dim": d.get("dk", 128), "linear_value_head_dim": d.get("dv", 128),
        "linear_conv_kernel_dim": d.get("conv", 4), "decoder_sparse_step": 1, "mlp_only_layers": [],
        "intermediate_size": config.mlp_hidden, **c.token_ids_out(config)}
    if config.mlp == "moe":
        mc = config.moe_cfg
        out.update({"num_experts": int(mc.get("n_experts", 8)), "num_experts_per_tok": int(mc.get("top_k", 2)),
                    "moe_intermediate_size": int(mc.get("d_expert", config.mlp_hidden)),
                    "shared_expert_intermediate_size": int(mc["d_shared"]),
                    "norm_topk_prob": bool(mc.get("normalize_top_k", True))})
    else:
        out.update({"num_experts": 0, "num_experts_per_tok": 0})
    return out


def _delta_in(src: dict, dst: dict, a: str, b: str, d: dict[str, int]) -> None:
    hk, r, dk, dv = d["hk"], d["hv"] // d["hk"], d["dk"], d["dv"]
    qkvz = src.pop(f"{a}.in_proj_qkvz.weight", None)
    if qkvz is not None:
        q, k, v, z = qkvz.unflatten(0, (hk, -1)).split([dk, dk, r * dv, r * dv], dim=1)
        for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("g_proj", z)):
            dst[f"{b}.{name}.weight"] = t.flatten(0, 1).clone()
    ba = src.pop(f"{a}.in_proj_ba.weight", None)
    if ba is not None:
        beta, alpha = ba.unflatten(0, (hk, -1)).split([r, r], dim=1)
        dst[f"{b}.b_proj.weight"] = beta.flatten(0, 1).clone()
        dst[f"{b}.a_proj.weight"] = alpha.flatten(0, 1).clone()
    c.move(src, dst, f"{a}.norm", f"{b}.o_norm")
    c.move(src, dst, f"{a}.out_proj", f"{b}.o_proj")
    c.move_prefix(src, dst, a, b)  # conv1d, A_log, dt_bias


def _delta_out(src: dict, dst: dict, b: str, a: str, d: dict[str, int]) -> None:
    hk = d["hk"]
    parts = [src.pop(f"{b}.{n}.weight").unflatten(0, (hk, -1)) for n in ("q_proj", "k_proj", "v_proj", "g_proj")]
    dst[f"{a}.in_proj_qkvz.weight"] = torch.cat(parts, dim=1).flatten(0, 1)
    ba = [src.pop(f"{b}.{n}.weight").unflatten(0, (hk, -1)) for n in ("b_proj", "a_proj")]
    dst[f"{a}.in_proj_ba.weight"] = torch.cat(ba, dim=1).flatten(0, 1)
    c.move(src, dst, f"{b}.o_norm", f"{a}.norm")
    c.move(src, dst, f"{b}.o_proj", f"{a}.out_proj")
    c.move_prefix(src, dst, b, a)


def _attention_in(src: dict, dst: dict, a: str, b: str, heads: int) -> None:
    for s in ("weight", "bias"):
        if f"{a}.q_proj.{s}" in src:
            q, gate = src.pop(f"{a}.q_proj.{s}").unflatten(0, (heads, 2, -1)).unbind(1)
            dst[f"{b}.in_proj.{s}"] = torch.cat([q.flatten(0, 1), gate.flatten(0, 1),
                                                 src.pop(f"{a}.k_proj.{s}"), src.pop(f"{a}.v_proj.{s}")])
    c.move(src, dst, f"{a}.o_proj", f"{b}.out_proj")
    c.move(src, dst, f"{a}.q_norm", f"{b}.q_norm")
    c.move(src, dst, f"{a}.k_norm", f"{b}.k_norm")


def _attention_out(src: dict, dst: dict, b: str, a: str, att: dict[str, Any]) -> None:
    h, dh = att["n_heads"], att["head_dim"]
    kv = att["n_kv_heads"] * dh
    for s in ("weight", "bias"):
        if f"{b}.in_proj.{s}" in src:
            q, gate, k, v = src.pop(f"{b}.in_proj.{s}").split([h * dh, h * dh, kv, kv])
            dst[f"{a}.q_proj.{s}"] = torch.stack([q.unflatten(0, (h, dh)), gate.unflatten(0, (h, dh))],
                                                 dim=1).flatten(0, 2)
            dst[f"{a}.k_proj.{s}"], dst[f"{a}.v_proj.{s}"] = k.clone(), v.clone()
    c.move(src, dst, f"{b}.out_proj", f"{a}.o_proj")
    c.move(src, dst, f"{b}.q_norm", f"{a}.q_norm")
    c.move(src, dst, f"{b}.k_norm", f"{a}.k_norm")


def _moe_in(src: dict, dst: dict, a: str, b: str) -> None:
    c.move(src, dst, f"{a}.gate", f"{b}.router")
    c.gated_mlp_in(src, dst, f"{a}.shared_expert.gate_proj", f"{a}.shared_expert.up_proj",
                   f"{a}.shared_expert.down_proj", f"{b}.shared")
    c.move(src, dst, f"{a}.shared_expert_gate", f"{b}.shared_gate")
    up, down = src.pop(f"{a}.experts.gate_up_proj", None), src.pop(f"{a}.experts.down_proj", None)
    for e in range(up.shape[0] if up is not None else 0):  # transformers 5's in-memory names
        dst[f"{b}.experts.{e}.fc1.weight"] = c.swap_halves(up[e])
        dst[f"{b}.experts.{e}.fc2.weight"] = down[e].clone()
    e = 0
    while f"{a}.experts.{e}.gate_proj.weight" in src:
        x = f"{a}.experts.{e}"
        c.gated_mlp_in(src, dst, f"{x}.gate_proj", f"{x}.up_proj", f"{x}.down_proj", f"{b}.experts.{e}")
        e += 1


def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = {k: v for k, v in sd.items() if not k.startswith("mtp.")}, {}
    att, _ = c.attention_fields(config)
    delta, _ = _delta_fields(config)
    c.move(src, dst, "model.embed_tokens", "backbone.embedding")
    c.move(src, dst, "model.norm", "backbone.norm_f")
    c.move(src, dst, "lm_head", "lm_head")
    for i, letter in enumerate(config.layer_pattern):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        c.move(src, dst, f"{a}.input_layernorm", f"{b}.norm")
        c.move(src, dst, f"{a}.post_attention_layernorm", f"{b}.norm2")
        if letter == "A":
            _attention_in(src, dst, f"{a}.self_attn", f"{b}.mixer", att["n_heads"])
        else:
            _delta_in(src, dst, f"{a}.linear_attn", f"{b}.mixer", delta)
        if config.mlp == "moe":
            _moe_in(src, dst, f"{a}.mlp", f"{b}.mlp")
        else:
            c.gated_mlp_in(src, dst, f"{a}.mlp.gate_proj", f"{a}.mlp.up_proj", f"{a}.mlp.down_proj", f"{b}.mlp")
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    att, _ = c.attention_fields(config)
    delta, _ = _delta_fields(config)
    c.move(src, dst, "backbone.embedding", "model.embed_tokens")
    c.move(src, dst, "backbone.norm_f", "model.norm")
    c.move(src, dst, "lm_head", "lm_head")
    n_exp = int(config.moe_cfg.get("n_experts", 8))
    for i, letter in enumerate(config.layer_pattern):
        a, b = f"model.layers.{i}", f"backbone.layers.{i}"
        c.move(src, dst, f"{b}.norm", f"{a}.input_layernorm")
        c.move(src, dst, f"{b}.norm2", f"{a}.post_attention_layernorm")
        if letter == "A":
            _attention_out(src, dst, f"{b}.mixer", f"{a}.self_attn", att)
        else:
            _delta_out(src, dst, f"{b}.mixer", f"{a}.linear_attn", delta)
        if config.mlp != "moe":
            c.gated_mlp_out(src, dst, f"{b}.mlp", f"{a}.mlp.gate_proj", f"{a}.mlp.up_proj", f"{a}.mlp.down_proj",
                            config.mlp_hidden)
            continue
        m, x = f"{b}.mlp", f"{a}.mlp"
        c.move(src, dst, f"{m}.router", f"{x}.gate")
        c.gated_mlp_out(src, dst, f"{m}.shared", f"{x}.shared_expert.gate_proj", f"{x}.shared_expert.up_proj",
                        f"{x}.shared_expert.down_proj", int(config.moe_cfg["d_shared"]))
        c.move(src, dst, f"{m}.shared_gate", f"{x}.shared_expert_gate")
        d_exp = int(config.moe_cfg.get("d_expert", config.mlp_hidden))
        for e in range(n_exp):
            c.gated_mlp_out(src, dst, f"{m}.experts.{e}", f"{x}.experts.{e}.gate_proj", f"{x}.experts.{e}.up_proj",
                            f"{x}.experts.{e}.down_proj", d_exp)
    return c.passthrough(src, dst)
