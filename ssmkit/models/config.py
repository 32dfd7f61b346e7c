"""``ModelConfig``: one dataclass describing every language model ssmkit builds.

A model is ``n_layer`` blocks; ``layer_pattern`` gives each block's mixer by one letter:

======  ==============================  =======================================
letter  mixer                           its settings
======  ==============================  =======================================
``M``   Mamba (selective SSM, S6)       ``ssm_cfg``
``2``   Mamba-2 (SSD)                   ``mamba2_cfg``
``3``   Mamba-3 (SISO or MIMO)          ``mamba3_cfg``
``A``   causal attention (MHA / GQA)    ``attn_cfg``
``D``   DeltaNet                        ``deltanet_cfg``
``G``   gated DeltaNet                  ``deltanet_cfg``
``S``   S4D                             ``s4d_cfg``
``H``   H3 (inner layer an option)      ``h3_cfg``
``Y``   Hyena                           ``hyena_cfg``
``F``   none: the block is an MLP       ``mlp_cfg``, ``d_intermediate``
``P``   Mamba-2 + attention in parallel ``mamba2_cfg``, ``attn_cfg``, ``parallel_cfg``
======  ==============================  =======================================

Each block is pre-norm residual: ``h = h + mixer(norm(h))`` and, when ``mlp`` is not ``"none"``,
``h = h + mlp(norm2(h))`` (SwiGLU, or a mixture of SwiGLU experts on the layers ``moe_cfg``
selects). This is the block of ``mamba_ssm``'s ``MixerModel``, so its checkpoints map 1:1.
An ``F`` block is ``h = h + mlp(norm(h))`` alone (Nemotron-H's MLP layers).

Shared blocks (Zamba2): ``shared_cfg`` (empty: none) adds ``n_blocks`` attention + MLP blocks whose
parameters are shared by every layer of ``shared_cfg["layers"]``; see :mod:`ssmkit.models.shared`.

Scalings of the Granite 4.0 models (1.0 leaves a model as it was): ``embedding_multiplier``
multiplies the embedding output, ``residual_multiplier`` every branch before its residual add, and
the logits are divided by ``logits_scaling``. Falcon-H1's further scalings live in the settings
they belong to: ``parallel_cfg`` (``attn_in_multiplier``, ``attn_out_multiplier``,
``ssm_out_multiplier`` of a ``P`` layer), ``mamba2_cfg`` (``in_multiplier``,
``in_proj_multipliers``), ``attn_cfg`` (``key_multiplier``) and ``mlp_cfg`` (``gate_multiplier``,
``down_multiplier``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

LAYER_LETTERS = {
    "M": "Mamba",
    "2": "Mamba-2",
    "3": "Mamba-3",
    "A": "attention",
    "D": "DeltaNet",
    "G": "gated DeltaNet",
    "S": "S4D",
    "H": "H3",
    "Y": "Hyena",
    "F": "MLP",
    "P": "Mamba-2 + attention",
}
PARALLEL_KEYS = ("attn_in_multiplier", "attn_out_multiplier", "ssm_out_multiplier")
MLP_CFG_KEYS = ("activation", "bias", "gate_multiplier", "down_multiplier")
MLP_KINDS = ("none", "swiglu", "moe")


@dataclass
class ModelConfig:
    """Architecture of a :class:`ssmkit.LanguageModel`.

    ``vocab_size`` is the tokenizer's size; the embedding has ``padded_vocab_size`` rows (rounded
    up to ``pad_vocab_size_multiple``, as ``mamba_ssm`` does for speed). ``d_intermediate`` is the
    SwiGLU hidden size (0 picks ``8/3 * d_model`` rounded up to a multiple of 64 when an MLP is on).
    ``moe_cfg``: ``n_experts`` (8), ``top_k`` (2), ``every`` (2: layers 1, 3, 5, ... use MoE; the
    offset is ``offset``, default 1, as in Jamba) or ``layers`` (explicit list of layer indices),
    ``d_expert`` (defaults to ``d_intermediate``), ``normalize_top_k`` (True), ``d_shared`` (0: the
    width of a shared expert every token goes through). ``mlp_cfg``: ``activation`` ("swiglu" or
    "relu2") and ``bias`` (False) of every MLP, experts included. ``hf_model_type``: the Hugging Face
    architecture ``save_pretrained(format="hf")`` writes (set when a model is loaded from one; None:
    chosen from the layers). ``zero_centred_norm``: the block and final RMSNorms store their weight
    as the offset from 1 (``x / rms(x) * (1 + weight)``, Qwen3-Next); ``moe_cfg`` ``shared_gate``
    weights the shared expert by ``sigmoid(w·x)`` per token.
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 8
    layer_pattern: str | None = None
    ssm_cfg: dict[str, Any] = field(default_factory=dict)
    mamba2_cfg: dict[str, Any] = field(default_factory=dict)
    attn_cfg: dict[str, Any] = field(default_factory=dict)
    deltanet_cfg: dict[str, Any] = field(default_factory=dict)
    s4d_cfg: dict[str, Any] = field(default_factory=dict)
    mlp: str = "none"
    d_intermediate: int = 0
    moe_cfg: dict[str, Any] = field(default_factory=dict)
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    mlp_cfg: dict[str, Any] = field(default_factory=dict)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    hf_model_type: str | None = None
    parallel_cfg: dict[str, Any] = field(default_factory=dict)
    shared_cfg: dict[str, Any] = field(default_factory=dict)
    h3_cfg: dict[str, Any] = field(default_factory=dict)
    hyena_cfg: dict[str, Any] = field(default_factory=dict)
    zero_centred_norm: bool = False
    mamba3_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.layer_pattern is None:
            self.layer_pattern = "M" * self.n_layer
        if not isinstance(self.layer_pattern, str):
            raise TypeError(f"ModelConfig.layer_pattern must be a string, got {type(self.layer_pattern).__name__}")
        if len(self.layer_pattern) != self.n_layer:
            raise ValueError(
                f"ModelConfig.layer_pattern has {len(self.layer_pattern)} letters "
                f"({self.layer_pattern!r}) but n_layer={self.n_layer}"
            )
        bad = sorted(set(self.layer_pattern) - set(LAYER_LETTERS))
        if bad:
            raise ValueError(
                f"ModelConfig.layer_pattern has unknown letters {bad}; use "
                + ", ".join(f"{k}={v}" for k, v in LAYER_LETTERS.items())
            )
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"ModelConfig.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if isinstance(self.d_intermediate, bool) or not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"ModelConfig.d_intermediate must be an int >= 0, got {self.d_intermediate!r}")
        for name in ("ssm_cfg", "mamba2_cfg", "attn_cfg", "deltanet_cfg", "s4d_cfg", "moe_cfg", "mlp_cfg",
                     "parallel_cfg", "shared_cfg", "h3_cfg", "hyena_cfg", "mamba3_cfg"):
            v = getattr(self, name)
            if v is None:
                setattr(self, name, {})
            elif not isinstance(v, dict):
                raise TypeError(f"ModelConfig.{name} must be a dict, got {type(v).__name__}")
            else:
                setattr(self, name, _from_json(v))
        if self.mlp == "moe":
            n_exp = self.moe_cfg.get("n_experts", 8)
            top_k = self.moe_cfg.get("top_k", 2)
            if not (isinstance(n_exp, int) and n_exp >= 1 and isinstance(top_k, int) and 1 <= top_k <= n_exp):
                raise ValueError(
                    f"ModelConfig.moe_cfg needs 1 <= top_k <= n_experts, got n_experts={n_exp!r}, top_k={top_k!r}"
                )
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0:
                raise ValueError(f"ModelConfig.{name} must be a finite nonzero number, got {v!r}")
            setattr(self, name, float(v))
        act = self.mlp_cfg.get("activation", "swiglu")
        if act not in ("swiglu", "relu2"):
            raise ValueError(f"ModelConfig.mlp_cfg['activation'] must be 'swiglu' or 'relu2', got {act!r}")
        extra = sorted(set(self.mlp_cfg) - set(MLP_CFG_KEYS))
        if extra:
            raise ValueError(f"ModelConfig.mlp_cfg has unknown keys {extra}; known keys: {', '.join(MLP_CFG_KEYS)}")
        scaled = [k for k in ("gate_multiplier", "down_multiplier") if self.mlp_cfg.get(k, 1.0) != 1.0]
        if scaled and (self.mlp == "moe" or act != "swiglu"):
            raise ValueError(f"ModelConfig.mlp_cfg {scaled}: the multipliers apply to dense SwiGLU MLPs only")
        extra = sorted(set(self.parallel_cfg) - set(PARALLEL_KEYS))
        if extra:
            raise ValueError(f"ModelConfig.parallel_cfg has unknown keys {extra}; known keys: {', '.join(PARALLEL_KEYS)}")
        if self.shared_cfg:
            from ssmkit.models.shared import check_shared_cfg

            check_shared_cfg(self)
        if self.hf_model_type is not None and not isinstance(self.hf_model_type, str):
            raise TypeError(f"ModelConfig.hf_model_type must be a string or None, got {self.hf_model_type!r}")

    # ----------------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width (``d_intermediate`` or the 8/3 rule rounded up to 64)."""
        if self.d_intermediate:
            return self.d_intermediate
        return int(math.ceil(8 * self.d_model / 3 / 64) * 64)

    def moe_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a mixture of experts."""
        if self.mlp != "moe":
            return []
        if "layers" in self.moe_cfg:
            return sorted(int(i) for i in self.moe_cfg["layers"])
        every = int(self.moe_cfg.get("every", 2))
        offset = int(self.moe_cfg.get("offset", 1 if every > 1 else 0))
        return [i for i in range(self.n_layer) if i % every == offset % every]

    def layer_mlp(self, i: int) -> str:
        """``"none"``, ``"swiglu"`` or ``"moe"`` for layer ``i``."""
        if self.mlp == "none":
            return "none"
        if self.mlp == "moe":
            return "moe" if i in self.moe_layers() else "swiglu"
        return "swiglu"

    @property
    def is_ssm_only(self) -> bool:
        """True when no layer keeps a KV cache (decoding memory is constant)."""
        return not set(self.layer_pattern) & {"A", "P"} and not self.shared_cfg

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():  # JSON has no tuples or inf: keep lists, strings
            if isinstance(v, dict):
                d[k] = _jsonable(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # ssmkit's config.json adds bookkeeping keys ("model_type", "ssmkit_version"): skip those.
        extra = sorted(k for k in d if k not in known and k not in ("model_type", "ssmkit_version", "architectures"))
        if extra:
            raise ValueError(f"unknown ModelConfig keys {extra}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name (see :data:`PRESETS`); ``overrides`` replace fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        d = json.loads(json.dumps(PRESETS[name]))  # deep copy
        d.update(overrides)
        return cls.from_dict(d)

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``24 layers (M*24), d_model 768, vocab 50280``."""
        counts = {c: self.layer_pattern.count(c) for c in LAYER_LETTERS if c in self.layer_pattern}
        mix = ", ".join(f"{n} {LAYER_LETTERS[c]}" for c, n in counts.items())
        return (f"{self.n_layer} layers ({mix}), d_model {self.d_model}, vocab {self.padded_vocab_size}, "
                f"mlp {self.mlp}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _from_json(v: Any) -> Any:
    """Inverse of :func:`_jsonable`; lists become tuples (mixers compare e.g. ``dt_limit`` to a tuple)."""
    if isinstance(v, dict):
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return tuple(_from_json(x) for x in v)
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return v


def _mamba(d_model: int, n_layer: int) -> dict[str, Any]:
    return {"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "pad_vocab_size_multiple": 8,
            "eos_token_id": 0}


def _mamba2(d_model: int, n_layer: int) -> dict[str, Any]:
    return {"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
            "layer_pattern": "2" * n_layer, "mamba2_cfg": {"d_state": 128, "headdim": 64, "expand": 2},
            "eos_token_id": 0}


def _mamba3(d_model: int, n_layer: int) -> dict[str, Any]:
    # Mamba-2's shapes (d_state 128, headdim 64, expand 2) with Mamba-3 mixers, SISO, half the
    # state rotated: the defaults of mamba_ssm's Mamba3
    return {"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
            "layer_pattern": "3" * n_layer, "mamba3_cfg": {"d_state": 128, "headdim": 64, "expand": 2},
            "eos_token_id": 0}


def _jamba_pattern(n_layer: int, period: int = 8, attn_offset: int = 4) -> str:
    # Jamba (Lieber et al., 2024): one attention layer per 8 (a:m = 1:7), at offset 4.
    return "".join("A" if i % period == attn_offset else "M" for i in range(n_layer))


PRESETS: dict[str, dict[str, Any]] = {
    # The published state-spaces/mamba-* checkpoints (Gu & Dao 2023, Table 12).
    "mamba-130m": _mamba(768, 24),
    "mamba-370m": _mamba(1024, 48),
    "mamba-790m": _mamba(1536, 48),
    "mamba-1.4b": _mamba(2048, 48),
    "mamba-2.8b": _mamba(2560, 64),
    # state-spaces/mamba2-* (Dao & Gu 2024).
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
    # Mamba-3 (Lahoti et al. 2026) in the Mamba-2 presets' shapes.
    "mamba3-130m": _mamba3(768, 24),
    "mamba3-370m": _mamba3(1024, 48),
    "mamba3-1.3b": _mamba3(2048, 48),
    # Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024) at about 130M parameters, no MLP, as the
    # Mamba presets: 6 heads with keys of 128 and values of 192 (131M parameters).
    "gated-deltanet-130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
                            "layer_pattern": "G" * 24,
                            "deltanet_cfg": {"num_heads": 6, "head_dim": 128, "expand_v": 1.5},
                            "eos_token_id": 0},
    # Jamba-style hybrids: Mamba + 1/8 attention, MoE (16 experts, top-2) every other layer.
    "jamba-tiny": {
        "d_model": 128, "n_layer": 8, "vocab_size": 257, "layer_pattern": _jamba_pattern(8),
        "attn_cfg": {"n_heads": 4, "n_kv_heads": 2}, "mlp": "moe", "d_intermediate": 256,
        "moe_cfg": {"n_experts": 4, "top_k": 2, "every": 2, "offset": 1}, "eos_token_id": 256,
    },
    "hybrid-small": {
        "d_model": 768, "n_layer": 16, "vocab_size": 50277, "layer_pattern": _jamba_pattern(16),
        "attn_cfg": {"n_heads": 12, "n_kv_heads": 4}, "mlp": "moe", "d_intermediate": 2048,
        "moe_cfg": {"n_experts": 16, "top_k": 2, "every": 2, "offset": 1}, "eos_token_id": 0,
    },
    "hybrid-1b": {
        "d_model": 2048, "n_layer": 32, "vocab_size": 50277, "layer_pattern": _jamba_pattern(32),
        "attn_cfg": {"n_heads": 16, "n_kv_heads": 8}, "mlp": "moe", "d_intermediate": 5632,
        "moe_cfg": {"n_experts": 16, "top_k": 2, "every": 2, "offset": 1}, "eos_token_id": 0,
    },
    # Mamba-2 + 1/8 attention + MoE (8 experts, top-2) every other layer: 377M parameters, 226M
    # active per token (the size the multi-GPU benchmarks train; docs/multi-gpu.md).
    "hybrid-370m": {
        "d_model": 1024, "n_layer": 16, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
        "layer_pattern": _jamba_pattern(16).replace("M", "2"),
        "mamba2_cfg": {"d_state": 128, "headdim": 64, "expand": 2},
        "attn_cfg": {"n_heads": 16, "n_kv_heads": 8}, "mlp": "moe", "d_intermediate": 1024,
        "moe_cfg": {"n_experts": 8, "top_k": 2, "every": 2, "offset": 1}, "eos_token_id": 0,
    },
    # Tiny models for tests and examples (byte-level vocabulary: 256 bytes + end-of-text = 257).
    "tiny-mamba": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "ssm_cfg": {"d_state": 8},
                   "eos_token_id": 256},
    "tiny-mamba2": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "layer_pattern": "22",
                    "mamba2_cfg": {"d_state": 16, "headdim": 16, "chunk_size": 16}, "eos_token_id": 256},
    "tiny-mamba3": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "layer_pattern": "33",
                    "mamba3_cfg": {"d_state": 16, "headdim": 16, "chunk_size": 16}, "eos_token_id": 256},
    "tiny-mamba3-mimo": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "layer_pattern": "33",
                         "mamba3_cfg": {"d_state": 16, "headdim": 16, "chunk_size": 8, "is_mimo": True,
                                        "mimo_rank": 2, "is_outproj_norm": True}, "eos_token_id": 256},
    "tiny-gated-deltanet": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "layer_pattern": "GG",
                            "deltanet_cfg": {"num_heads": 2, "head_dim": 16, "chunk_size": 16},
                            "eos_token_id": 256},
    "tiny-attention": {"d_model": 64, "n_layer": 2, "vocab_size": 257, "layer_pattern": "AA",
                       "attn_cfg": {"n_heads": 4, "n_kv_heads": 2}, "mlp": "swiglu", "d_intermediate": 128,
                       "eos_token_id": 256},
    "tiny-hybrid": {
        "d_model": 64, "n_layer": 4, "vocab_size": 257, "layer_pattern": "MA2M",
        "ssm_cfg": {"d_state": 8}, "mamba2_cfg": {"d_state": 16, "headdim": 16, "chunk_size": 16},
        "attn_cfg": {"n_heads": 4, "n_kv_heads": 2}, "mlp": "moe", "d_intermediate": 96,
        "moe_cfg": {"n_experts": 4, "top_k": 2, "every": 2, "offset": 1}, "eos_token_id": 256,
    },
}
