"""Hugging Face ``GraniteMoeHybridForCausalLM`` (IBM's Granite 4.0-H: Mamba-2 + attention, with a
mixture of experts and a shared expert, or one dense MLP, in every layer).

A Granite layer is ssmkit's block with Granite's scalings: ``h += m * mixer(input_layernorm(h))``,
then ``h += m * (moe(x) + shared_mlp(x))`` with ``x = post_attention_layernorm(h)`` and
``m = residual_multiplier``; the embedding output is multiplied by ``embedding_multiplier`` and the
logits divided by ``logits_scaling``. Config keys map as::

    layer_types "mamba" / "attention" -> layer_pattern "2" / "A"  (also "linear_attention" / "full_attention")
    num_local_experts > 0 -> mlp="moe" on every layer: moe_cfg n_experts, top_k (num_experts_per_tok),
        d_expert (intermediate_size), d_shared (shared_intermediate_size)
    num_local_experts == 0 -> mlp="swiglu" with d_intermediate = shared_intermediate_size
    attention_multiplier -> attn_cfg softmax_scale       position_embedding_type "rope" -> rope_dim = head_dim
    (None / "nope": no positional encoding, rope_dim = 0)   embedding_multiplier, residual_multiplier,
    logits_scaling -> the ModelConfig fields of the same names; mamba_* as in :mod:`.hf_bamba`

Router: transformers takes the softmax over the top-k router logits; ssmkit's MoE takes the softmax
over all experts and renormalises the top k (``normalize_top_k``): the same weights.

Weights, as the published checkpoints store them: ``block_sparse_moe.input_linear.weight``
``(E, 2 I, H)`` holds each expert's ``[gate; up]``, which is ssmkit's ``experts.{e}.fc1`` with its
halves swapped (``[up; gate]``); ``output_linear.weight`` ``(E, H, I)`` is ``experts.{e}.fc2``;
``router.layer.weight`` is ``router.weight``; ``shared_mlp.input_linear`` / ``output_linear`` are
``mlp.shared.fc1`` (halves swapped) / ``fc2`` (``mlp.fc1`` / ``fc2`` without experts). transformers
5's in-memory names (``experts.gate_up_proj``, ``experts.down_proj``, ``router.weight``) load too.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "granitemoehybrid"
FAMILY = "Granite 4.0-H"
_MAMBA = ("mamba", "linear_attention")
_ATTENTION = ("attention", "full_attention")


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "hidden_act", ("silu",), "silu", FAMILY)
    c.expect(cfg, "normalization_function", ("rmsnorm",), "rmsnorm", FAMILY)
    pos = c.expect(cfg, "position_embedding_type", (None, "nope", "rope"), None, FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(c.need(cfg, "num_hidden_layers", FAMILY))
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * n_layer
    bad = sorted({t for t in types if t not in _MAMBA + _ATTENTION})
    if bad or len(types) != n_layer:
        raise ValueError(f"config.json layer_types must list num_hidden_layers={n_layer} of "
                         f"'mamba' / 'attention', got {len(types)} with {bad or 'no'} unknown kinds")
    n_heads = int(cfg.get("num_attention_heads", 32))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    if d_model % n_heads:
        raise ValueError(f"config.json: num_attention_heads={n_heads} must divide hidden_size={d_model}")
    head_dim = d_model // n_heads
    if float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json rope_parameters.partial_rotary_factor: Granite 4.0-H rotates whole heads")
    bias = bool(cfg.get("attention_bias", False))
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    m2 = c.mamba2_cfg_of(cfg, d_model, eps)
    n_exp = int(cfg.get("num_local_experts") or 0)
    shared = int(cfg.get("shared_intermediate_size", 1024))
    if shared <= 0:
        raise ValueError(f"config.json shared_intermediate_size={shared}: Granite 4.0-H needs its shared MLP (> 0)")
    if n_exp:
        top_k = int(cfg.get("num_experts_per_tok", 2))
        mlp = {"mlp": "moe", "d_intermediate": int(cfg.get("intermediate_size", 11008)),
               "moe_cfg": {"n_experts": n_exp, "top_k": top_k, "every": 1, "d_shared": shared}}
    else:
        mlp = {"mlp": "swiglu", "d_intermediate": shared}
    attn = {"n_heads": n_heads, "n_kv_heads": n_kv, "rope_dim": head_dim if pos == "rope" else 0,
            "softmax_scale": float(cfg.get("attention_multiplier", 1.0)), "qkv_bias": bias, "out_bias": bias}
    if pos == "rope":
        attn["rope_theta"] = c.rope_theta(cfg, FAMILY)
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern="".join("2" if t in _MAMBA else "A" for t in types),
        mamba2_cfg=m2, attn_cfg=attn, **mlp, rms_norm=True, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Granite 4.0-H checkpoint (None if it can)."""
    pat = config.layer_pattern
    if not set(pat) <= {"2", "A"}:
        return f"layer_pattern {pat!r}: Granite 4.0-H layers are Mamba-2 (2) or attention (A)"
    if config.mlp_cfg.get("activation", "swiglu") != "swiglu" or config.mlp_cfg.get("bias", False):
        return "Granite 4.0-H's MLPs are SwiGLU without biases"
    if config.mlp == "moe":
        m = config.moe_cfg
        if config.moe_layers() != list(range(config.n_layer)):
            return "Granite 4.0-H has its mixture of experts on every layer"
        if not int(m.get("d_shared", 0)):
            return "Granite 4.0-H's mixture of experts has a shared expert (moe_cfg d_shared)"
        if not m.get("normalize_top_k", True):
            return "Granite 4.0-H normalises the top-k router weights"
    elif config.mlp != "swiglu":
        return "Granite 4.0-H has an MLP in every layer (mlp='swiglu' or 'moe')"
    if c.mlp_multipliers_why(config):
        return c.mlp_multipliers_why(config)
    if not config.rms_norm:
        return "Granite 4.0-H uses RMSNorm"
    if "2" in pat:
        why = c.mamba2_expand_why(config)
        if why:
            return why
    if "A" in pat:
        a, why = c.attention_fields(config)
        if why:
            return why
        if a["head_dim"] * a["n_heads"] != config.d_model:
            return "Granite 4.0-H's attention heads fill d_model (head_dim = d_model / n_heads)"
        if a["rope_dim"] not in (0, a["head_dim"]):
            return "Granite 4.0-H rotates whole heads or none (rope_dim = head_dim or 0)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    a, _ = c.attention_fields(config)
    m, _ = c.mamba2_fields(config)
    out: dict[str, Any] = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": MODEL_TYPE,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
        "use_cache": True, "layer_types": ["attention" if ch == "A" else "mamba" for ch in config.layer_pattern],
        "embedding_multiplier": config.embedding_multiplier, "residual_multiplier": config.residual_multiplier,
        "logits_scaling": config.logits_scaling,
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"], "attention_bias": a["bias"],
        "attention_multiplier": a["softmax_scale"] if a["softmax_scale"] is not None else a["head_dim"] ** -0.5,
        "position_embedding_type": "rope" if a["rope_dim"] else "nope",
        "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"]},
        "mamba_n_heads": m["n_heads"], "mamba_d_head": m["head_dim"], "mamba_expand": m["expand"],
        "mamba_d_state": m["d_state"], "mamba_d_conv": m["d_conv"], "mamba_n_groups": m["n_groups"],
        "mamba_chunk_size": m["chunk_size"], "mamba_conv_bias": m["conv_bias"], "mamba_proj_bias": m["bias"],
        "time_step_limit": m["limit"], **c.token_ids_out(config)}
    if config.mlp == "moe":
        mc = config.moe_cfg
        out.update({"num_local_experts": int(mc.get("n_experts", 8)), "num_experts_per_tok": int(mc.get("top_k", 2)),
                    "intermediate_size": int(mc.get("d_expert", config.mlp_hidden)),
                    "shared_intermediate_size": int(mc["d_shared"])})
    else:
        out.update({"num_local_experts": 0, "num_experts_per_tok": 0, "intermediate_size": config.mlp_hidden,
                    "shared_intermediate_size": config.mlp_hidden})
    return out



def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    for _i, a, b in c.layers_in(src, dst, config, final_norm="norm", norm2="post_attention_layernorm"):
        shared = f"{b}.mlp.shared" if config.mlp == "moe" else f"{b}.mlp"
        if f"{a}.shared_mlp.input_linear.weight" in src:
            dst[f"{shared}.fc1.weight"] = c.swap_halves(src.pop(f"{a}.shared_mlp.input_linear.weight"))
        c.move(src, dst, f"{a}.shared_mlp.output_linear", f"{shared}.fc2")
        if config.mlp != "moe":
            continue
        moe = f"{a}.block_sparse_moe"
        router = c.pop_any(src, f"{moe}.router.layer.weight", f"{moe}.router.weight")
        up = c.pop_any(src, f"{moe}.input_linear.weight", f"{moe}.experts.gate_up_proj")
        down = c.pop_any(src, f"{moe}.output_linear.weight", f"{moe}.experts.down_proj")
        if router is not None:
            dst[f"{b}.mlp.router.weight"] = router
        for e in range(up.shape[0] if up is not None else 0):
            dst[f"{b}.mlp.experts.{e}.fc1.weight"] = c.swap_halves(up[e])
        for e in range(down.shape[0] if down is not None else 0):
            dst[f"{b}.mlp.experts.{e}.fc2.weight"] = down[e].clone()
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    n_exp = int(config.moe_cfg.get("n_experts", 8))
    for _i, a, b in c.layers_out(src, dst, config, final_norm="norm", norm2="post_attention_layernorm"):
        shared = f"{b}.mlp.shared" if config.mlp == "moe" else f"{b}.mlp"
        dst[f"{a}.shared_mlp.input_linear.weight"] = c.swap_halves(src.pop(f"{shared}.fc1.weight"))
        c.move(src, dst, f"{shared}.fc2", f"{a}.shared_mlp.output_linear")
        if config.mlp != "moe":
            continue
        moe = f"{a}.block_sparse_moe"
        dst[f"{moe}.router.layer.weight"] = src.pop(f"{b}.mlp.router.weight")
        dst[f"{moe}.input_linear.weight"] = torch.stack(
            [c.swap_halves(src.pop(f"{b}.mlp.experts.{e}.fc1.weight")) for e in range(n_exp)])
        dst[f"{moe}.output_linear.weight"] = torch.stack(
            [src.pop(f"{b}.mlp.experts.{e}.fc2.weight") for e in range(n_exp)])
    return c.passthrough(src, dst)
