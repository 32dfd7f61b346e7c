"""Hugging Face ``transformers`` format: ``MambaForCausalLM`` and ``Mamba2ForCausalLM`` here, and the
hybrids ``BambaForCausalLM`` (:mod:`.hf_bamba`), ``GraniteMoeHybridForCausalLM`` (:mod:`.hf_granite`),
``NemotronHForCausalLM`` (:mod:`.hf_nemotron_h`), ``FalconH1ForCausalLM`` (:mod:`.hf_falcon_h1`),
``JambaForCausalLM`` (:mod:`.hf_jamba`), ``Zamba2ForCausalLM`` (:mod:`.hf_zamba2`) and
``Qwen3NextForCausalLM`` (:mod:`.hf_qwen3_next`), picked by
``model_type``. Saving picks the architecture the model was loaded from
(``ModelConfig.hf_model_type``), else the first that can hold it: Mamba / Mamba-2 for pure models,
then Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1, Jamba, Qwen3-Next (Zamba2 for a model with shared blocks).

Mamba / Mamba-2:

Parameter names equal ssmkit's except the embedding (``backbone.embeddings`` in HF,
``backbone.embedding`` in ssmkit / mamba_ssm). Config keys map as::

    hidden_size -> d_model              num_hidden_layers -> n_layer     layer_norm_epsilon -> norm_eps
    state_size -> d_state               conv_kernel -> d_conv            expand -> expand
    time_step_rank -> dt_rank (Mamba)   head_dim -> headdim (Mamba-2)    n_groups -> ngroups
    use_bias -> bias                    use_conv_bias -> conv_bias       time_step_limit -> dt_limit
    tie_word_embeddings -> tie_embeddings

The vocabulary is taken as-is (``pad_vocab_size_multiple = 1``): HF configs store the padded size.

Mamba-2 note: Hugging Face's gated RMSNorm uses ``layer_norm_epsilon`` where mamba_ssm uses 1e-5,
and older ``transformers`` versions normalised over all of d_inner regardless of ``n_groups``;
mamba_ssm's grouped norm is ssmkit's reference. With ``n_groups == 1`` (and eps 1e-5) all agree.
"""

from __future__ import annotations

import math
from typing import Any

from ssmkit.models.config import ModelConfig
from ssmkit.models.formats import (
    hf_bamba,
    hf_falcon_h1,
    hf_granite,
    hf_jamba,
    hf_nemotron_h,
    hf_qwen3_next,
    hf_zamba2,
)
from ssmkit.models.formats.hf_common import token_ids

NAME = "hf"
# model_type -> the module of a hybrid family (to_model_config, why_not, from_model_config,
# state_dict_in, state_dict_out)
HYBRIDS = {m.MODEL_TYPE: m for m in (hf_bamba, hf_granite, hf_nemotron_h, hf_falcon_h1, hf_jamba, hf_zamba2,
                                          hf_qwen3_next)}
MODEL_TYPES = ("mamba", "mamba2", *HYBRIDS)
WEIGHTS = "model.safetensors"

_MAMBA_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
               "dt_init_floor", "dt_scale", "dt_init", "use_gate"}
_MAMBA2_KEYS = {"d_state", "d_conv", "expand", "headdim", "ngroups", "bias", "conv_bias", "chunk_size",
                "dt_limit", "dt_min", "dt_max", "dt_init_floor", "rmsnorm", "norm_before_gate", "D_has_hdim",
                "A_init_range"}


def matches(cfg: dict) -> bool:
    return cfg.get("model_type") in MODEL_TYPES


def _float(x: Any) -> float:
    """A JSON number; transformers writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(x, dict) and "__float__" in x:
        x = x["__float__"]
    return float(x)


def _float_json(x: float) -> Any:
    """``x`` as written to config.json: a plain number, ``Infinity`` included (Python's json
    writes and reads it; transformers 4.x reads only that, 5.x reads it and its own
    ``{"__float__": ...}`` tag)."""
    return float(x)


def to_model_config(cfg: dict) -> ModelConfig:
    mt = cfg.get("model_type")
    if mt in HYBRIDS:
        return HYBRIDS[mt].to_model_config(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg.get('hidden_act')!r}: only 'silu' is supported")
    try:
        d_model = int(cfg["hidden_size"])
        n_layer = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config.json (Hugging Face {mt}) lacks the key {e.args[0]!r}") from e
    expand = cfg.get("expand", 2)
    common = dict(d_model=d_model, n_layer=n_layer, vocab_size=vocab, pad_vocab_size_multiple=1,
                  rms_norm=True, norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                  residual_in_fp32=bool(cfg.get("residual_in_fp32", True)), **token_ids(cfg))
    dt_init = {"dt_min": cfg.get("time_step_min", 0.001), "dt_max": cfg.get("time_step_max", 0.1),
               "dt_init_floor": cfg.get("time_step_floor", 1e-4)}
    if mt == "mamba":
        rank = cfg.get("time_step_rank", "auto")
        rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
        ssm = {"d_state": int(cfg.get("state_size", 16)), "d_conv": int(cfg.get("conv_kernel", 4)),
               "expand": expand, "dt_rank": rank, "conv_bias": bool(cfg.get("use_conv_bias", True)),
               "bias": bool(cfg.get("use_bias", False)), **dt_init}
        return ModelConfig(layer_pattern="M" * n_layer, ssm_cfg=ssm,
                           tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), **common)
    headdim = int(cfg.get("head_dim", 64))
    n_heads = cfg.get("num_heads")
    if n_heads is not None and int(n_heads) * headdim != int(expand * d_model):
        raise ValueError(f"config.json: num_heads*head_dim = {int(n_heads) * headdim} must equal "
                         f"expand*hidden_size = {int(expand * d_model)}")
    limit = cfg.get("time_step_limit", (0.0, math.inf))
    m2 = {"d_state": int(cfg.get("state_size", 128)), "d_conv": int(cfg.get("conv_kernel", 4)),
          "expand": expand, "headdim": headdim, "ngroups": int(cfg.get("n_groups", 1)),
          "bias": bool(cfg.get("use_bias", False)), "conv_bias": bool(cfg.get("use_conv_bias", True)),
          "chunk_size": int(cfg.get("chunk_size", 256)), "dt_limit": tuple(_float(x) for x in limit), **dt_init}
    return ModelConfig(layer_pattern="2" * n_layer, mamba2_cfg=m2,
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **common)


def _family(config: ModelConfig):
    """The hybrid family module ``config`` is written as, or None for the Mamba / Mamba-2 path."""
    mt = config.hf_model_type
    if mt in HYBRIDS or config.shared_cfg:  # shared blocks: only Zamba2 holds them
        fam = hf_zamba2 if config.shared_cfg else HYBRIDS[mt]
        why = fam.why_not(config)
        if why:
            raise ValueError(f"cannot save this model as Hugging Face {fam.MODEL_TYPE}: {why} "
                             "(set hf_model_type=None to let ssmkit pick, or use format='ssmkit')")
        return fam
    pure = set(config.layer_pattern) in ({"M"}, {"2"}) and config.mlp == "none"
    if pure or config.hf_model_type in ("mamba", "mamba2"):
        return None
    reasons = []
    for name, fam in HYBRIDS.items():
        why = fam.why_not(config)
        if why is None:
            return fam
        reasons.append(f"{name}: {why}")
    raise ValueError(f"cannot save this model in Hugging Face format: layer_pattern {config.layer_pattern!r} "
                     f"(mlp={config.mlp!r}) mixes layer kinds or adds MLPs, and no Hugging Face hybrid holds it ("
                     + "; ".join(reasons) + "); use format='ssmkit'")


def state_dict_in(sd: dict, config: ModelConfig) -> dict:
    """Checkpoint tensors -> ssmkit's names (hybrids also join projections)."""
    fam = HYBRIDS.get(config.hf_model_type)
    return fam.state_dict_in(sd, config) if fam else {key_in(k): v for k, v in sd.items()}


def state_dict_out(sd: dict, config: ModelConfig) -> dict:
    fam = _family(config)
    return fam.state_dict_out(sd, config) if fam else {key_out(k): v for k, v in sd.items()}


def from_model_config(config: ModelConfig) -> dict[str, Any]:
    fam = _family(config)
    if fam is not None:
        return fam.from_model_config(config)
    pat = config.layer_pattern
    why = None
    if set(pat) not in ({"M"}, {"2"}):
        why = f"layer_pattern {pat!r} mixes layer kinds; Hugging Face's Mamba models are all-M or all-2"
    elif config.mlp != "none":
        why = f"mlp={config.mlp!r}; Hugging Face's Mamba models have no MLP"
    elif not config.rms_norm:
        why = "rms_norm=False; Hugging Face's Mamba models use RMSNorm"
    if why:
        raise ValueError(f"cannot save this model in Hugging Face format: {why} (use format='ssmkit')")
    ids = {k: getattr(config, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")
           if getattr(config, k) is not None}
    base = {"hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
            "vocab_size": config.padded_vocab_size, "layer_norm_epsilon": config.norm_eps,
            "residual_in_fp32": config.residual_in_fp32, "tie_word_embeddings": config.tie_embeddings,
            "hidden_act": "silu", "use_cache": True, **ids}
    if pat[0] == "M":
        c = dict(config.ssm_cfg)
        c.pop("layer", None)
        extra = sorted(set(c) - _MAMBA_KEYS)
        if extra or not c.get("use_gate", True):
            bad = extra or ["use_gate=False"]
            raise ValueError(f"cannot save in Hugging Face format: ssm_cfg {bad} has no MambaConfig equivalent")
        d_model = config.d_model
        rank = c.get("dt_rank", "auto")
        rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **base,
                "state_size": c.get("d_state", 16), "conv_kernel": c.get("d_conv", 4),
                "expand": c.get("expand", 2), "time_step_rank": rank,
                "use_bias": c.get("bias", False), "use_conv_bias": c.get("conv_bias", True),
                "time_step_min": c.get("dt_min", 0.001), "time_step_max": c.get("dt_max", 0.1),
                "time_step_floor": c.get("dt_init_floor", 1e-4)}
    c = dict(config.mamba2_cfg)
    c.pop("layer", None)
    extra = sorted(set(c) - _MAMBA2_KEYS)
    unsupported = [k for k, ok in (("rmsnorm", c.get("rmsnorm", True)),
                                   ("norm_before_gate", not c.get("norm_before_gate", False)),
                                   ("D_has_hdim", not c.get("D_has_hdim", False))) if not ok]
    if extra or unsupported:
        raise ValueError(f"cannot save in Hugging Face format: mamba2_cfg {extra + unsupported} has no "
                         "Mamba2Config equivalent")
    expand = c.get("expand", 2)
    headdim = c.get("headdim", 64)
    d_inner = int(expand * config.d_model)
    limit = c.get("dt_limit", (0.0, math.inf))
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **base,
            "state_size": c.get("d_state", 128), "conv_kernel": c.get("d_conv", 4), "expand": expand,
            "head_dim": headdim, "num_heads": d_inner // headdim, "n_groups": c.get("ngroups", 1),
            "use_bias": c.get("bias", False), "use_conv_bias": c.get("conv_bias", True),
            "chunk_size": c.get("chunk_size", 256),
            "time_step_limit": [_float_json(float(limit[0])), _float_json(float(limit[1]))],
            "time_step_min": c.get("dt_min", 0.001), "time_step_max": c.get("dt_max", 0.1),
            "time_step_floor": c.get("dt_init_floor", 1e-4)}


def key_in(key: str) -> str:
    if key.startswith("backbone.embeddings."):
        return "backbone.embedding." + key[len("backbone.embeddings."):]
    return key


def key_out(key: str) -> str:
    if key.startswith("backbone.embedding."):
        return "backbone.embeddings." + key[len("backbone.embedding."):]
    return key
