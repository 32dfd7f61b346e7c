"""Hugging Face ``BambaForCausalLM`` (IBM's Bamba: Mamba-2 + attention, a SwiGLU MLP in every layer).

Every Bamba layer is ssmkit's block: ``h += mixer(input_layernorm(h))`` with a Mamba-2 mixer, or
attention on the layers of ``attn_layer_indices``, then ``h += mlp(pre_ff_layernorm(h))``. So a
Bamba model is a ``layer_pattern`` of ``2`` and ``A`` with ``mlp="swiglu"``. Config keys map as::

    hidden_size -> d_model            num_hidden_layers -> n_layer       rms_norm_eps -> norm_eps
    intermediate_size -> d_intermediate                                  attn_layer_indices -> "A" letters
    num_attention_heads / num_key_value_heads -> attn_cfg n_heads / n_kv_heads (head_dim = hidden / heads)
    rope_parameters.rope_theta -> attn_cfg rope_theta   (RoPE on half of each head: rope_dim = head_dim / 2)
    mamba_n_heads * mamba_d_head -> Mamba-2 d_inner     mamba_d_state / d_conv / n_groups / chunk_size
    mamba_conv_bias / mamba_proj_bias -> conv_bias / bias    time_step_limit -> dt_limit
    attention_bias -> attn_cfg qkv_bias and out_bias          mlp_bias -> mlp_cfg bias

Weights: ``model.layers.{i}.mamba.*`` are ssmkit's Mamba-2 names under ``backbone.layers.{i}.mixer``;
attention's ``q_proj``/``k_proj``/``v_proj`` are stacked into ``in_proj``, ``o_proj`` is
``out_proj``; the MLP's ``[up_proj; gate_proj]`` is ``fc1`` and ``down_proj`` is ``fc2``.

Sources: transformers 5.25 and the original Bamba code (IBM's foundation-model-stack, on
mamba_ssm's Mamba2) agree: RoPE on the first half of each head (``partial_rotary_factor`` fixed at
0.5), and the model's ``rms_norm_eps`` in the Mamba-2 gated norm. An ``attn_rotary_emb`` key other
than half a head is refused (both implementations ignore it; the checkpoint would mean otherwise).
"""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "bamba"
FAMILY = "Bamba"


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "hidden_act", ("silu",), "silu", FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(c.need(cfg, "num_hidden_layers", FAMILY))
    attn = sorted(int(i) for i in (cfg.get("attn_layer_indices") or []))
    if any(not 0 <= i < n_layer for i in attn):
        raise ValueError(f"config.json attn_layer_indices={attn} must lie in [0, num_hidden_layers={n_layer})")
    n_heads = int(cfg.get("num_attention_heads", 32))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    if d_model % n_heads:
        raise ValueError(f"config.json: num_attention_heads={n_heads} must divide hidden_size={d_model}")
    head_dim = d_model // n_heads
    rotary = cfg.get("attn_rotary_emb")
    if rotary is not None and int(rotary) != head_dim // 2:
        raise ValueError(f"config.json attn_rotary_emb={rotary}: Bamba rotates half of each head "
                         f"({head_dim // 2} channels); another width is not supported")
    bias = bool(cfg.get("attention_bias", False))
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    m2 = c.mamba2_cfg_of(cfg, d_model, eps)
    pattern = "".join("A" if i in attn else "2" for i in range(n_layer))
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern=pattern, mamba2_cfg=m2,
        attn_cfg={"n_heads": n_heads, "n_kv_heads": n_kv, "rope_dim": head_dim // 2,
                  "rope_theta": c.rope_theta(cfg, FAMILY), "qkv_bias": bias, "out_bias": bias},
        mlp="swiglu", d_intermediate=int(cfg.get("intermediate_size", 14336)),
        mlp_cfg={"bias": True} if cfg.get("mlp_bias") else {},
        rms_norm=True, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Bamba checkpoint (None if it can)."""
    pat = config.layer_pattern
    if not set(pat) <= {"2", "A"}:
        return f"layer_pattern {pat!r}: Bamba layers are Mamba-2 (2) or attention (A)"
    if config.mlp != "swiglu" or config.mlp_cfg.get("activation", "swiglu") != "swiglu":
        return "Bamba has a SwiGLU MLP in every layer (mlp='swiglu')"
    if c.mlp_multipliers_why(config):
        return c.mlp_multipliers_why(config)
    if not config.rms_norm:
        return "Bamba uses RMSNorm"
    if (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) != (1.0, 1.0, 1.0):
        return "Bamba has no embedding / residual / logits multipliers"
    if "2" in pat:
        why = c.mamba2_expand_why(config)
        if why:
            return why
    if "A" in pat:
        a, why = c.attention_fields(config)
        if why:
            return why
        if a["head_dim"] * a["n_heads"] != config.d_model:
            return "Bamba's attention heads fill d_model (head_dim = d_model / n_heads)"
        if a["rope_dim"] != a["head_dim"] // 2:
            return f"Bamba rotates half of each head (rope_dim {a['head_dim'] // 2}, got {a['rope_dim']})"
        if a["softmax_scale"] is not None:
            return "Bamba's attention scale is 1/sqrt(head_dim)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["BambaForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "intermediate_size": config.mlp_hidden, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "mlp_bias": bool(config.mlp_cfg.get("bias", False)), "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "use_cache": True,
        "attn_layer_indices": [i for i, ch in enumerate(config.layer_pattern) if ch == "A"],
        **c.token_ids_out(config)}
    a, _ = c.attention_fields(config)
    out.update({"num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"],
                "attention_bias": a["bias"],
                "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"],
                                    "partial_rotary_factor": 0.5}})
    m, _ = c.mamba2_fields(config)
    out.update({"mamba_n_heads": m["n_heads"], "mamba_d_head": m["head_dim"], "mamba_expand": m["expand"],
                "mamba_d_state": m["d_state"], "mamba_d_conv": m["d_conv"], "mamba_n_groups": m["n_groups"],
                "mamba_chunk_size": m["chunk_size"], "mamba_conv_bias": m["conv_bias"],
                "mamba_proj_bias": m["bias"], "time_step_limit": m["limit"]})
    return out


def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    for _i, a, b in c.layers_in(src, dst, config, final_norm="final_layernorm", norm2="pre_ff_layernorm"):
        c.gated_mlp_in(src, dst, f"{a}.feed_forward.gate_proj", f"{a}.feed_forward.up_proj",
                       f"{a}.feed_forward.down_proj", f"{b}.mlp")
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    for _i, a, b in c.layers_out(src, dst, config, final_norm="final_layernorm", norm2="pre_ff_layernorm"):
        c.gated_mlp_out(src, dst, f"{b}.mlp", f"{a}.feed_forward.gate_proj", f"{a}.feed_forward.up_proj",
                        f"{a}.feed_forward.down_proj", config.mlp_hidden)
    return c.passthrough(src, dst)
