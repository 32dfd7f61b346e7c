"""ModelConfig: presets, JSON round trip, validation."""

import json
import math

import pytest

from ssmkit import ModelConfig
from ssmkit.models.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = ModelConfig.from_name(name)
    assert len(cfg.layer_pattern) == cfg.n_layer
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    json.loads(cfg.to_json())  # plain JSON


def test_published_sizes():
    c = ModelConfig.from_name("mamba-130m")
    assert (c.d_model, c.n_layer, c.padded_vocab_size, c.layer_pattern) == (768, 24, 50280, "M" * 24)
    assert ModelConfig.from_name("mamba-2.8b").d_model == 2560
    c2 = ModelConfig.from_name("mamba2-2.7b")
    assert c2.layer_pattern == "2" * 64 and c2.mamba2_cfg["d_state"] == 128
    j = ModelConfig.from_name("jamba-tiny")
    assert j.layer_pattern == "MMMMAMMM" and j.moe_layers() == [1, 3, 5, 7]
    assert [j.layer_mlp(i) for i in range(2)] == ["swiglu", "moe"]


def test_defaults_and_training_engineer_usage():
    c = ModelConfig(d_model=64, n_layer=2, vocab_size=16, ssm_cfg={"use_gate": False}, mlp="none")
    assert c.layer_pattern == "MM" and c.padded_vocab_size == 16 and c.is_ssm_only
    c = ModelConfig(d_model=64, n_layer=2, vocab_size=10, mamba2_cfg={"dt_limit": (0.0, math.inf)},
                    layer_pattern="2A")
    assert c.padded_vocab_size == 16 and not c.is_ssm_only
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["mamba2_cfg"]["dt_limit"] == [0.0, "inf"]


@pytest.mark.parametrize("kw, match", [
    ({"layer_pattern": "MX"}, "unknown letters"),
    ({"layer_pattern": "MMM"}, "n_layer=2"),
    ({"mlp": "relu"}, "mlp must be one of"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"mlp": "moe", "moe_cfg": {"n_experts": 2, "top_k": 3}}, "top_k"),
    ({"ssm_cfg": [1]}, "ssm_cfg must be a dict"),
])
def test_invalid_configs_name_the_field(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig(**{"d_model": 8, "n_layer": 2, "vocab_size": 8, **kw})


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="known presets"):
        ModelConfig.from_name("mamba-9b")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_model": 8, "n_layer": 1, "vocab_size": 8, "hidden": 3})


def test_new_fields_default_to_the_old_model_and_are_checked():
    old = ModelConfig.from_name("tiny-hybrid").to_dict()
    for k in ("mlp_cfg", "embedding_multiplier", "residual_multiplier", "logits_scaling", "hf_model_type"):
        old.pop(k)
    assert ModelConfig.from_dict(old) == ModelConfig.from_name("tiny-hybrid")  # a config saved before them
    assert "1 MLP" in ModelConfig(d_model=32, n_layer=2, layer_pattern="2F").describe()
    for kw, match in ((dict(logits_scaling=0), "logits_scaling"), (dict(residual_multiplier=float("nan")),
                      "residual_multiplier"), (dict(mlp_cfg={"activation": "gelu"}), "activation"),
                      (dict(mlp_cfg={"act": "relu2"}), "unknown keys")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(d_model=32, n_layer=2, **kw)


def test_hybrid_370m_size():
    """The multi-GPU benchmarks' hybrid: Mamba-2 + attention + MoE, ~370M parameters."""
    import torch

    from ssmkit import LanguageModel

    cfg = ModelConfig.from_name("hybrid-370m")
    assert set(cfg.layer_pattern) == {"2", "A"} and cfg.mlp == "moe"
    with torch.device("meta"):
        model = LanguageModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * cfg.moe_cfg["top_k"] // cfg.moe_cfg["n_experts"]
    assert 360e6 < total < 390e6 and 215e6 < active < 235e6, (total, active)
