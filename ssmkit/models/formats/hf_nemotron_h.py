"""Hugging Face ``NemotronHForCausalLM`` (NVIDIA's Nemotron-H and Nemotron Nano 2: Mamba-2, attention
and MLP layers).

Each Nemotron-H layer is one residual branch, ``h += mixer(norm(h))``, whose mixer is Mamba-2
(``M``), attention (``*``) or an MLP (``-``). ssmkit's blocks without ``norm2`` / ``mlp`` are the
same, with the MLP layer as letter ``F``: ``hybrid_override_pattern`` ``"M-M*-"`` is
``layer_pattern`` ``"2F2AF"``. Config keys map as::

    hybrid_override_pattern / layers_block_type -> layer_pattern (M -> 2, * -> A, - -> F)
    hidden_size -> d_model        layer_norm_epsilon -> norm_eps (and the Mamba-2 gated norm's)
    mamba_num_heads * mamba_head_dim -> Mamba-2 d_inner (``expand`` is not used: Nemotron Nano 2's
        heads do not fill a whole multiple of hidden_size)    ssm_state_size -> d_state
    n_groups -> ngroups   conv_kernel -> d_conv   chunk_size -> chunk_size   use_conv_bias -> conv_bias
    use_bias -> bias (Mamba-2 in_proj / out_proj)   time_step_limit -> dt_limit
    num_attention_heads / num_key_value_heads / head_dim -> attn_cfg (no positional encoding: rope_dim 0)
    intermediate_size -> d_intermediate    mlp_hidden_act "relu2" -> mlp_cfg activation   mlp_bias -> bias
    residual_in_fp32 -> residual_in_fp32

Weights: the published checkpoints' names (``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f``, ``lm_head``) are ssmkit's, except
``embeddings`` (``embedding``), attention's ``q_proj``/``k_proj``/``v_proj`` (stacked into
``in_proj``) and ``o_proj`` (``out_proj``), and the MLP's ``up_proj`` / ``down_proj`` (``fc1`` /
``fc2``). transformers 5's in-memory prefix ``model.`` loads too. Multi-token-prediction weights
(``mtp.*``) are not part of the language model and are skipped, as transformers does.

Not covered: the mixture-of-experts layers (``E``, Nemotron 3) and sliding-window attention; such
configs are refused with one error. Sources: the original Nemotron-H code builds attention's
projections with ``bias=attention_bias`` while transformers 5.25 never gives them a bias; the two
agree on every published checkpoint (``attention_bias: false``), and ssmkit refuses ``true``.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import hf_common as c

MODEL_TYPE = "nemotron_h"
FAMILY = "Nemotron-H"
_KINDS = {"M": "2", "linear_attention": "2", "mamba": "2", "*": "A", "full_attention": "A", "attention": "A",
          "-": "F", "mlp": "F"}


def _pattern(cfg: dict) -> str:
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    if kinds is None:
        kinds = list(c.need(cfg, "hybrid_override_pattern", FAMILY))
    moe = [k for k in kinds if k in ("E", "moe")]
    if moe:
        raise ValueError("config.json: Nemotron-H mixture-of-experts layers ('E' / 'moe') are not supported "
                         "(Mamba-2 'M', attention '*' and MLP '-' layers are)")
    bad = sorted({str(k) for k in kinds if k not in _KINDS})
    if bad:
        raise ValueError(f"config.json: unknown Nemotron-H layer kinds {bad}; expected M / * / - "
                         "(or linear_attention / full_attention / mlp)")
    return "".join(_KINDS[k] for k in kinds)


def _get(cfg: dict, key: str, legacy: str, default: Any) -> Any:
    """``cfg[key]``, else its older spelling ``cfg[legacy]`` (transformers reads both), else ``default``."""
    return cfg[key] if key in cfg else cfg.get(legacy, default)


def to_model_config(cfg: dict) -> ModelConfig:
    c.expect(cfg, "mamba_hidden_act", ("silu",), "silu", FAMILY)
    c.expect(cfg, "mlp_hidden_act", ("relu2",), "relu2", FAMILY)
    c.expect(cfg, "attention_bias", (False,), False, FAMILY)
    c.expect(cfg, "sliding_window", (None,), None, FAMILY)
    pattern = _pattern(cfg)
    d_model = int(c.need(cfg, "hidden_size", FAMILY))
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    limit = _get(cfg, "time_step_limit", "mamba_dt_limit", None)
    dt_init = {"dt_min": float(_get(cfg, "time_step_min", "mamba_dt_min", 0.001)),
               "dt_max": float(_get(cfg, "time_step_max", "mamba_dt_max", 0.1)),
               "dt_init_floor": float(_get(cfg, "time_step_floor", "mamba_dt_init_floor", 1e-4))}
    m2 = c.mamba2_cfg(d_model=d_model, n_heads=int(cfg.get("mamba_num_heads", 128)),
                      head_dim=int(cfg.get("mamba_head_dim", 64)), expand=_get(cfg, "expand", "mamba_expand", 2),
                      d_state=int(cfg.get("ssm_state_size", 128)), d_conv=int(_get(cfg, "conv_kernel", "mamba_d_conv", 4)),
                      n_groups=int(_get(cfg, "n_groups", "mamba_n_groups", 8)),
                      chunk_size=int(_get(cfg, "chunk_size", "mamba_chunk_size", 128)),
                      conv_bias=bool(_get(cfg, "use_conv_bias", "mamba_conv_bias", True)),
                      bias=bool(cfg.get("use_bias", False)), limit=limit, norm_eps=eps, dt_init=dt_init)
    n_heads = int(cfg.get("num_attention_heads", 32))
    mlp_cfg: dict[str, Any] = {"activation": "relu2"}
    if cfg.get("mlp_bias"):
        mlp_cfg["bias"] = True
    return ModelConfig(
        d_model=d_model, n_layer=len(pattern), vocab_size=int(c.need(cfg, "vocab_size", FAMILY)),
        pad_vocab_size_multiple=1, layer_pattern=pattern, mamba2_cfg=m2,
        attn_cfg={"n_heads": n_heads, "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
                  "head_dim": int(cfg.get("head_dim") or d_model // n_heads), "rope_dim": 0},
        mlp="none", d_intermediate=int(cfg.get("intermediate_size", 21504)), mlp_cfg=mlp_cfg,
        rms_norm=True, norm_eps=eps, residual_in_fp32=bool(cfg.get("residual_in_fp32", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), hf_model_type=MODEL_TYPE,
        **c.token_ids(cfg))


def why_not(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be written as a Nemotron-H checkpoint (None if it can)."""
    pat = config.layer_pattern
    if not set(pat) <= {"2", "A", "F"}:
        return f"layer_pattern {pat!r}: Nemotron-H layers are Mamba-2 (2), attention (A) or MLP (F)"
    if config.mlp != "none":
        return "Nemotron-H puts MLPs in layers of their own (letter F, mlp='none')"
    if "F" in pat and config.mlp_cfg.get("activation", "swiglu") != "relu2":
        return "Nemotron-H's MLP layers use the squared ReLU (mlp_cfg activation 'relu2')"
    if not config.rms_norm:
        return "Nemotron-H uses RMSNorm"
    if (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) != (1.0, 1.0, 1.0):
        return "Nemotron-H has no embedding / residual / logits multipliers"
    if "2" in pat:
        m, why = c.mamba2_fields(config)
        if why:
            return why
        if m["norm_eps"] != config.norm_eps:
            return "Nemotron-H's Mamba-2 gated norm uses the model's norm_eps"
    if "A" in pat:
        a, why = c.attention_fields(config)
        if why:
            return why
        if a["rope_dim"] or a["softmax_scale"] is not None or a["bias"]:
            return "Nemotron-H's attention has no positional encoding (rope_dim 0), no bias and scale 1/sqrt(head_dim)"
    return None


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    letters = {"2": "M", "A": "*", "F": "-"}
    out: dict[str, Any] = {
        "architectures": ["NemotronHForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "hybrid_override_pattern": "".join(letters[ch] for ch in config.layer_pattern),
        "layer_norm_epsilon": config.norm_eps, "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
        "use_cache": True, "intermediate_size": config.mlp_hidden, "mlp_hidden_act": "relu2",
        "mlp_bias": bool(config.mlp_cfg.get("bias", False)), "mamba_hidden_act": "silu",
        "attention_bias": False, **c.token_ids_out(config)}
    a, _ = c.attention_fields(config)
    out.update({"num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"],
                "head_dim": a["head_dim"]})
    m, _ = c.mamba2_fields(config)
    mc = config.mamba2_cfg
    out.update({"mamba_num_heads": m["n_heads"], "mamba_head_dim": m["head_dim"], "ssm_state_size": m["d_state"],
                "n_groups": m["n_groups"], "conv_kernel": m["d_conv"], "chunk_size": m["chunk_size"],
                "expand": max(1, m["d_inner"] // config.d_model), "use_conv_bias": m["conv_bias"],
                "use_bias": m["bias"], "time_step_limit": m["limit"],
                "time_step_min": mc.get("dt_min", 0.001), "time_step_max": mc.get("dt_max", 0.1),
                "time_step_floor": mc.get("dt_init_floor", 1e-4)})
    return out


def state_dict_in(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    dst: dict[str, torch.Tensor] = {}
    root = "model" if any(k.startswith("model.") for k in src) else "backbone"
    c.move(src, dst, f"{root}.embeddings", "backbone.embedding")
    c.move(src, dst, f"{root}.norm_f", "backbone.norm_f")
    c.move(src, dst, "lm_head", "lm_head")
    for i, letter in enumerate(config.layer_pattern):
        a, b = f"{root}.layers.{i}", f"backbone.layers.{i}"
        c.move(src, dst, f"{a}.norm", f"{b}.norm")
        if letter == "A":
            c.attention_in(src, dst, f"{a}.mixer", f"{b}.mixer")
        elif letter == "F":
            c.move(src, dst, f"{a}.mixer.up_proj", f"{b}.mixer.fc1")
            c.move(src, dst, f"{a}.mixer.down_proj", f"{b}.mixer.fc2")
        else:
            c.move_prefix(src, dst, f"{a}.mixer", f"{b}.mixer")
    return c.passthrough(src, dst)


def state_dict_out(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    src, dst = dict(sd), {}
    att, _ = c.attention_fields(config)
    c.move(src, dst, "backbone.embedding", "backbone.embeddings")
    c.move(src, dst, "backbone.norm_f", "backbone.norm_f")
    c.move(src, dst, "lm_head", "lm_head")
    for i, letter in enumerate(config.layer_pattern):
        b = f"backbone.layers.{i}"
        c.move(src, dst, f"{b}.norm", f"{b}.norm")
        if letter == "A":
            c.attention_out(src, dst, f"{b}.mixer", f"{b}.mixer", att)
        elif letter == "F":
            c.move(src, dst, f"{b}.mixer.fc1", f"{b}.mixer.up_proj")
            c.move(src, dst, f"{b}.mixer.fc2", f"{b}.mixer.down_proj")
        else:
            c.move_prefix(src, dst, f"{b}.mixer", f"{b}.mixer")
    return c.passthrough(src, dst)
