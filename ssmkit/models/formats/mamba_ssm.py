"""``mamba_ssm``'s ``MambaLMHeadModel`` format: ``config.json`` (its ``MambaConfig``) and
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``; ``model.safetensors`` is also
accepted). Parameter names are ssmkit's own.

Config: ``d_model, d_intermediate, n_layer, vocab_size, ssm_cfg ({"layer": "Mamba1" | "Mamba2" |
"Mamba3", ...}), attn_layer_idx, attn_cfg, rms_norm, residual_in_fp32, fused_add_norm,
pad_vocab_size_multiple, tie_embeddings``. Attention uses mamba_ssm's MHA names (``num_heads``,
``num_heads_kv``, ``rotary_emb_dim`` (default 0: no RoPE), ``qkv_proj_bias`` / ``out_proj_bias``
(default True)); a nonzero ``d_intermediate`` puts a gated MLP (SwiGLU) on every layer.
"""

from __future__ import annotations

from typing import Any

from ssmkit.models.config import ModelConfig

NAME = "mamba_ssm"
LETTERS = {"Mamba1": "M", "Mamba2": "2", "Mamba3": "3"}  # ssm_cfg["layer"] -> layer letter
CFG_FIELDS = {"M": "ssm_cfg", "2": "mamba2_cfg", "3": "mamba3_cfg"}  # layer letter -> ModelConfig field
WEIGHTS = "pytorch_model.bin"


def matches(cfg: dict) -> bool:
    return "d_model" in cfg and "n_layer" in cfg and "model_type" not in cfg


def to_model_config(cfg: dict) -> ModelConfig:
    try:
        d_model, n_layer, vocab = int(cfg["d_model"]), int(cfg["n_layer"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config.json (mamba_ssm) lacks the key {e.args[0]!r}") from e
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in LETTERS:
        raise ValueError(f"config.json ssm_cfg['layer']={layer!r}: expected 'Mamba1', 'Mamba2' or 'Mamba3'")
    letter = LETTERS[layer]
    if letter == "3":
        for k in ("dropout", "n_layer"):  # keyword arguments mamba_ssm's Mamba3 takes and ignores
            ssm.pop(k, None)
    attn_idx = [int(i) for i in (cfg.get("attn_layer_idx") or [])]
    bad = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"config.json attn_layer_idx {bad} out of range for n_layer={n_layer}")
    pattern = "".join("A" if i in attn_idx else letter for i in range(n_layer))
    attn = dict(cfg.get("attn_cfg") or {})
    # mamba_ssm MHA defaults differ from ssmkit's Attention: no RoPE unless asked, biases on.
    attn.setdefault("rotary_emb_dim", 0)
    attn.setdefault("qkv_proj_bias", True)
    attn.setdefault("out_proj_bias", True)
    d_int = int(cfg.get("d_intermediate", 0) or 0)
    kw: dict[str, Any] = {CFG_FIELDS[letter]: ssm}
    return ModelConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=vocab,
        pad_vocab_size_multiple=int(cfg.get("pad_vocab_size_multiple", 8)), layer_pattern=pattern,
        attn_cfg=attn if attn_idx else {}, mlp="swiglu" if d_int else "none", d_intermediate=d_int,
        rms_norm=bool(cfg.get("rms_norm", True)), norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        tie_embeddings=bool(cfg.get("tie_embeddings", True)), eos_token_id=cfg.get("eos_token_id"),
        **kw,
    )


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    pat = config.layer_pattern
    kinds = set(pat) - {"A"}
    why = None
    if kinds - set(CFG_FIELDS):
        why = f"layer_pattern {pat!r} has layers mamba_ssm cannot build ({sorted(kinds - set(CFG_FIELDS))})"
    elif len(kinds) > 1:
        why = f"layer_pattern {pat!r} mixes Mamba generations; mamba_ssm has one ssm_cfg"
    elif config.mlp == "moe":
        why = "mlp='moe'; mamba_ssm has no mixture of experts"
    elif [k for k in ("gate_multiplier", "down_multiplier") if config.mlp_cfg.get(k, 1.0) != 1.0]:
        why = "mlp_cfg gate/down multipliers; mamba_ssm's GatedMLP has none"
    elif {"inner_norms", "in_multiplier", "in_proj_multipliers"} & set(
            getattr(config, CFG_FIELDS[min(kinds or {"M"})])):
        why = "ssm settings mamba_ssm does not have (Jamba's inner norms or Falcon-H1's multipliers)"
    elif config.shared_cfg:
        why = "shared_cfg (shared attention blocks); mamba_ssm's models have none"
    elif norm_eps_bad(config):
        why = f"norm_eps={config.norm_eps}; mamba_ssm's blocks use 1e-5"
    if why:
        raise ValueError(f"cannot save this model in mamba_ssm format: {why} (use format='ssmkit')")
    letter = (kinds or {"M"}).pop()
    ssm = dict(getattr(config, CFG_FIELDS[letter]))
    ssm.pop("layer", None)
    if not ssm.get("use_gate", True):
        raise ValueError("cannot save in mamba_ssm format: ssm_cfg use_gate=False has no mamba_ssm equivalent")
    if ssm.get("inner", "s6") != "s6":
        raise ValueError(f"cannot save in mamba_ssm format: ssm_cfg inner={ssm['inner']!r} has no mamba_ssm equivalent")
    ssm = {"layer": {v: k for k, v in LETTERS.items()}[letter], **ssm}
    attn_idx = [i for i, c in enumerate(pat) if c == "A"]
    attn_cfg: dict[str, Any] = {}
    if attn_idx:
        from ssmkit.layers.attention import normalize_attn_cfg

        a = normalize_attn_cfg(config.attn_cfg)
        n_heads = a.get("n_heads", max(1, config.d_model // 64))
        head_dim = a.get("head_dim", config.d_model // n_heads)
        extra = sorted(set(a) - {"n_heads", "n_kv_heads", "head_dim", "rope_theta", "rope_dim", "qkv_bias",
                                 "out_bias", "softmax_scale", "max_seqlen"})
        if extra:
            raise ValueError(f"cannot save in mamba_ssm format: attn_cfg {extra} has no MHA equivalent")
        attn_cfg = {"num_heads": n_heads, "num_heads_kv": a.get("n_kv_heads", n_heads), "head_dim": head_dim,
                    "rotary_emb_dim": a.get("rope_dim", head_dim), "rotary_emb_base": a.get("rope_theta", 10000.0),
                    "qkv_proj_bias": a.get("qkv_bias", False), "out_proj_bias": a.get("out_bias", False)}
        if a.get("softmax_scale") is not None:
            attn_cfg["softmax_scale"] = a["softmax_scale"]
    from ssmkit.models.config import _jsonable

    return {
        "d_model": config.d_model, "d_intermediate": config.mlp_hidden if config.mlp == "swiglu" else 0,
        "n_layer": config.n_layer, "vocab_size": config.vocab_size, "ssm_cfg": _jsonable(ssm),
        "attn_layer_idx": attn_idx, "attn_cfg": attn_cfg, "rms_norm": config.rms_norm,
        "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple, "tie_embeddings": config.tie_embeddings,
    }


def norm_eps_bad(config: ModelConfig) -> bool:
    return abs(config.norm_eps - 1e-5) > 1e-12


def key_in(key: str) -> str:
    return key


def key_out(key: str) -> str:
    return key
