"""Hugging Face ``JambaForCausalLM`` (AI21's Jamba: Mamba-1 with RMS norms on Δ, B and C, attention
every ``attn_layer_period`` layers, a mixture of experts every ``expert_layer_period`` layers).

Every Jamba layer is ssmkit's block: ``h += mixer(input_layernorm(h))`` with a Mamba mixer (``M``,
``ssm_cfg inner_norms``) or attention without positional encoding (``A``, ``rope_dim 0``), then
``h += ffn(pre_ff_layernorm(h))`` with a SwiGLU MLP or, on the expert layers, a mixture of SwiGLU
experts. Config keys map as::

    hidden_size -> d_model     num_hidden_layers -> n_layer     rms_norm_eps -> norm_eps (and the
        Mamba mixer's inner norms)      attn_layer_period / attn_layer_offset -> "A" letters
    mamba_d_state / d_conv / expand / dt_rank -> ssm_cfg d_state / d_conv / expand / dt_rank
    mamba_conv_bias / mamba_proj_bias -> ssm_cfg conv_bias / bias
    num_attention_heads / num_key_value_heads (/ head_dim) -> attn_cfg (rope_dim 0, no bias)
    num_experts > 1 -> mlp="moe": moe_cfg n_experts, top_k (num_experts_per_tok), every / offset
        (expert_layer_period / expert_layer_offset), normalize_top_k False
    num_experts == 1 -> mlp="swiglu"        intermediate_size -> d_intermediate (experts too)

Router: softmax over all experts, the top-k weights not renormalised (ssmkit's
``normalize_top_k=False``), in transformers and in AI21's original code alike.

Weights: ``model.layers.{i}.mamba.*`` are ssmkit's Mamba names (``dt_layernorm``, ``b_layernorm``,
``c_layernorm`` included) under ``backbone.layers.{i}.mixer``; attention's
``q_proj``/``k_proj``/``v_proj`` are stacked into ``in_proj``, ``o_proj`` is ``out_proj``; the
MLP's and each expert's ``[up_proj; gate_proj]`` is ``fc1``, ``down_proj`` is ``fc2``;
``feed_forward.router`` is ``mlp.router``. The published per-expert names
(``feed_forward.experts.{e}.gate_proj``, ...) are read and written; transformers 5's in-memory
names (``experts.gate_up_proj`` ``(E, 2 I, H)`` as ``[gate; up]``, ``experts.down_proj``) load too.

Sources: transformers 5.25 and AI21's original code agree on the structure above; the original's
``use_mamba_kernels`` (its CUDA path) computes the same function and is ignored. The original
code's ``sliding_window`` (flash-attention only; null in every published config) is not read by
transformers 5.25; ssmkit refuses a non-null value rather than guess.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "jamba"
FAMILY = "Jamba"
_MAMBA_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "inner_norms", "inner_norm_eps",
               "dt_min", "dt_max", "dt_init_floor", "dt_scale", "dt_init", "use_gate"}


def _every(n_layer: int, period: int, offset: int, what: str) -> list[int]:
    if period < 1 or not 0 <= offset < period:
        raise ValueError(f"config.json {what}_layer_offset={offset} must lie in [0, {what}_layer_period={period})")
    return [i for i in range(n_layer) if i % period == offset]


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "hidden_act", ("silu",), "silu", FAMILY)
    c.expect(cfg, "sliding_window", (None,), None, FAMILY)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    n_layer = int(c.need(cfg, "num_hidden_layers", FAMILY))
    attn = _every(n_layer, int(cfg.get("attn_layer_period", 8)), int(cfg.get("attn_layer_offset", 4)), "attn")
    n_heads = int(cfg.get("num_attention_heads", 32))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or d_model // n_heads)
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    rank = cfg.get("mamba_dt_rank", "auto")
    rank = math.ceil(d_model / 16) if rank in ("auto", None) else int(rank)
    ssm = {"d_state": int(cfg.get("mamba_d_state", 16)), "d_conv": int(cfg.get("mamba_d_conv", 4)),
           "expand": int(cfg.get("mamba_expand", 2)), "dt_rank": rank,
           "conv_bias": bool(cfg.get("mamba_conv_bias", True)), "bias": bool(cfg.get("mamba_proj_bias", False)),
           "inner_norms": True, "inner_norm_eps": eps}
    n_exp = int(cfg.get("num_experts", cfg.get("num_local_experts", 16)))
    inter = int(cfg.get("intermediate_size", 14336))
    if n_exp > 1:
        period, offset = int(cfg.get("expert_layer_period", 2)), int(cfg.get("expert_layer_offset", 1))
        _every(n_layer, period, offset, "expert")
        top_k = int(cfg.get("num_experts_per_tok", 2))
        if not 1 <= top_k <= n_exp:
            raise ValueError(f"config.json num_experts_per_tok={top_k} must lie in [1, num_experts={n_exp}]")
        mlp = {"mlp": "moe", "moe_cfg": {"n_experts": n_exp, "top_k": top_k, "every": period, "offset": offset,
                                         "normalize_top_k": False}}
    else:
        mlp = {"mlp": "swiglu"}
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern="".join("A" if i in attn else "M" for i in range(n_layer)),
        ssm_cfg=ssm, attn_cfg={"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim, "rope_dim": 0},
        d_intermediate=inter, **mlp, rms_norm=True, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def _period(layers: list[int], n_layer: int) -> tuple[int, int] | None:
    """``(period, offset)`` with ``layers == [i for i < n_layer if i % period == offset]``, or None."""
    if not layers:
        return n_layer + 1, n_layer  # no such layer (offset < period, as transformers checks)
    for period in range(1, n_layer + 1):
        if layers[0] < period and _every(n_layer, period, layers[0], "") == layers:
            return period, layers[0]
    return None


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Jamba checkpoint (None if it can)."""
    pat = config.layer_pattern
    if not set(pat) <= {"M", "A"}:
        return f"layer_pattern {pat!r}: Jamba layers are Mamba (M) or attention (A)"
    if _period([i for i, ch in enumerate(pat) if ch == "A"], config.n_layer) is None:
        return f"layer_pattern {pat!r}: Jamba's attention layers repeat with one period and offset"
    if config.mlp not in ("swiglu", "moe") or config.mlp_cfg:
        return "Jamba has a SwiGLU MLP (or mixture of experts) without biases or multipliers in every layer"
    if config.mlp == "moe":
        m = config.moe_cfg
        if _period(config.moe_layers(), config.n_layer) is None:
            return "Jamba's expert layers repeat with one period and offset"
        if m.get("normalize_top_k", True) or int(m.get("d_shared", 0)):
            return "Jamba's router leaves the top-k weights unnormalised and has no shared expert"
        if int(m.get("d_expert", config.mlp_hidden)) != config.mlp_hidden:
            return "Jamba's experts and dense MLPs have one width (intermediate_size)"
    if not config.rms_norm:
        return "Jamba uses RMSNorm"
    if (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) != (1.0, 1.0, 1.0):
        return "Jamba has no embedding / residual / logits multipliers"
    if "M" in pat:
        s = dict(config.ssm_cfg)
        s.pop("layer", None)
        extra = sorted(set(s) - _MAMBA_KEYS)
        if extra or not s.get("inner_norms", False) or not s.get("use_gate", True):
            return f"Jamba's Mamba has the inner norms and a gate (ssm_cfg inner_norms=True; {extra or 'no'} extra keys)"
        if float(s.get("inner_norm_eps", 1e-6)) != config.norm_eps:
            return "Jamba's Mamba inner norms use the model's norm_eps"
    if "A" in pat:
        a, why = c.attention_fields(config)
        if why:
            return why
        if a["rope_dim"] or a["bias"] or a["softmax_scale"] is not None:
            return "Jamba's attention has no positional encoding (rope_dim 0), no bias and scale 1/sqrt(head_dim)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    pat = config.layer_pattern
    attn_period, attn_offset = _period([i for i, ch in enumerate(pat) if ch == "A"], config.n_layer)
    a, _ = c.attention_fields(config)
    s = config.ssm_cfg
    rank = s.get("dt_rank", "auto")
    out: dict[str, Any] = {
        "architectures": ["JambaForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "intermediate_size": config.mlp_hidden, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
        "use_cache": True, "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"], "head_dim": a["head_dim"],
        "mamba_d_state": int(s.get("d_state", 16)), "mamba_d_conv": int(s.get("d_conv", 4)),
        "mamba_expand": int(s.get("expand", 2)),
        "mamba_dt_rank": math.ceil(config.d_model / 16) if rank == "auto" else int(rank),
        "mamba_conv_bias": bool(s.get("conv_bias", True)), "mamba_proj_bias": bool(s.get("bias", False)),
        **c.token_ids_out(config)}
    if config.mlp == "moe":
        period, offset = _period(config.moe_layers(), config.n_layer)
        out.update({"num_experts": int(config.moe_cfg.get("n_experts", 8)),
                    "num_experts_per_tok": int(config.moe_cfg.get("top_k", 2)),
                    "expert_layer_period": period, "expert_layer_offset": offset})
    else:
        out.update({"num_experts": 1, "num_experts_per_tok": 1, "expert_layer_period": 1, "expert_layer_offset": 0})
    return out



def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    n_exp = int(config.moe_cfg.get("n_experts", 8))
    for i, a, b in c.layers_in(src, dst, config, final_norm="final_layernorm", norm2="pre_ff_layernorm"):
        ff = f"{a}.feed_forward"
        if config.layer_mlp(i) != "moe":
            c.gated_mlp_in(src, dst, f"{ff}.gate_proj", f"{ff}.up_proj", f"{ff}.down_proj", f"{b}.mlp")
            continue
        c.move(src, dst, f"{ff}.router", f"{b}.mlp.router")
        gate_up = c.pop_any(src, f"{ff}.experts.gate_up_proj")
        down = c.pop_any(src, f"{ff}.experts.down_proj")
        for e in range(n_exp):
            if gate_up is not None:
                dst[f"{b}.mlp.experts.{e}.fc1.weight"] = c.swap_halves(gate_up[e])
            if down is not None:
                dst[f"{b}.mlp.experts.{e}.fc2.weight"] = down[e].clone()
            x = f"{ff}.experts.{e}"
            c.gated_mlp_in(src, dst, f"{x}.gate_proj", f"{x}.up_proj", f"{x}.down_proj", f"{b}.mlp.experts.{e}")
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    n_exp = int(config.moe_cfg.get("n_experts", 8))
    hidden = config.mlp_hidden
    for i, a, b in c.layers_out(src, dst, config, final_norm="final_layernorm", norm2="pre_ff_layernorm"):
        ff = f"{a}.feed_forward"
        if config.layer_mlp(i) != "moe":
            c.gated_mlp_out(src, dst, f"{b}.mlp", f"{ff}.gate_proj", f"{ff}.up_proj", f"{ff}.down_proj", hidden)
            continue
        c.move(src, dst, f"{b}.mlp.router", f"{ff}.router")
        for e in range(n_exp):
            x = f"{ff}.experts.{e}"
            c.gated_mlp_out(src, dst, f"{b}.mlp.experts.{e}", f"{x}.gate_proj", f"{x}.up_proj", f"{x}.down_proj",
                            hidden)
    return c.passthrough(src, dst)
