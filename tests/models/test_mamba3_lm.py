"""Mamba-3 language models: layer letter 3 in hybrids (attention, MoE), cached decoding and
generation, save/load in the ssmkit and mamba_ssm formats, presets."""

import json

import pytest
import torch

import ssmkit
from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, generate, prefill
from ssmkit.testing import assert_close

SISO = {"d_state": 8, "headdim": 8, "chunk_size": 4}
MIMO = {"d_state": 8, "headdim": 8, "chunk_size": 4, "is_mimo": True, "mimo_rank": 2, "is_outproj_norm": True,
        "rope_fraction": 1.0}
TINY = {
    "siso": dict(d_model=32, n_layer=2, vocab_size=50, layer_pattern="33", mamba3_cfg=SISO),
    "mimo-hybrid-moe": dict(d_model=32, n_layer=4, vocab_size=50, layer_pattern="3A32", mamba3_cfg=MIMO,
                            mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4},
                            attn_cfg={"n_heads": 4, "n_kv_heads": 2}, mlp="moe", d_intermediate=48,
                            moe_cfg={"n_experts": 4, "top_k": 2, "every": 2}),
}


def build(name, **kw):
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(**{**TINY[name], **kw})).eval()
    with torch.no_grad():  # non-trivial Mamba-3 biases and MIMO weights
        for n, p in m.named_parameters():
            if any(k in n for k in ("B_bias", "C_bias", "mimo_", "mixer.D")):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", list(TINY))
def test_cached_decoding_and_continuation_equal_full_forward(name):
    m = build(name)
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = m(ids).logits
        cache = allocate_cache(m, 2, 11)
        got = [prefill(m, ids[:, :3], cache)]
        got += [decode_one_token(m, ids[:, t], cache) for t in range(3, 7)]
        rest = m(ids[:, 7:], cache=cache).logits
    assert_close("decode", full[:, 2:7], torch.stack(got, 1), rel=1e-5)
    assert_close("continuation", full[:, 7:], rest, rel=1e-5)


def test_generation_left_padding_and_greedy_tokens():
    m = build("mimo-hybrid-moe")
    p1, p2 = torch.randint(0, 50, (1, 4)), torch.randint(0, 50, (1, 7))
    batch = torch.cat([torch.cat([torch.full((1, 3), 7), p1], 1), p2])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = m(batch, attention_mask=mask).logits
        assert_close("row 0", m(p1).logits, out[:1, 3:], rel=1e-5)
        g = generate(m, p2, max_new_tokens=5)
        ids = p2
        for _ in range(5):  # greedy by full forwards
            ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(g, ids)


@pytest.mark.parametrize("fmt,name", [("ssmkit", "mimo-hybrid-moe"), ("mamba_ssm", "siso"),
                                      ("mamba_ssm", "mimo-hybrid-moe")])
def test_save_load_round_trip(tmp_path, fmt, name):
    if fmt == "mamba_ssm" and name != "siso":
        kw = dict(layer_pattern="3A33", mlp="swiglu", moe_cfg={}, mamba2_cfg={})
    else:
        kw = {}
    m = build(name, **kw)
    m.save_pretrained(tmp_path, format=fmt)
    m2 = ssmkit.from_pretrained(tmp_path)
    assert m2.config.layer_pattern == m.config.layer_pattern and m2.checkpoint_format == fmt
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    if fmt == "mamba_ssm":
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["ssm_cfg"]["layer"] == "Mamba3"
        sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        assert "backbone.layers.0.mixer.B_bias" in sd and "backbone.layers.0.mixer.dt_bias" in sd


def test_mamba_ssm_config_with_mamba3_and_refusals(tmp_path):
    cfg = {"d_model": 32, "n_layer": 2, "vocab_size": 50, "d_intermediate": 0,
           "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 16, "is_mimo": True, "mimo_rank": 2,
                       "dropout": 0.0}}
    c = ssmkit.models.formats.mamba_ssm.to_model_config(cfg)
    assert c.layer_pattern == "33" and c.mamba3_cfg["mimo_rank"] == 2 and "dropout" not in c.mamba3_cfg
    LanguageModel(c)
    with pytest.raises(ValueError, match="mixes Mamba generations"):
        build("siso", layer_pattern="32", mamba2_cfg={"d_state": 8, "headdim": 16}).save_pretrained(
            tmp_path, format="mamba_ssm")


def test_presets_build_the_right_shapes():
    c = ModelConfig.from_name("mamba3-130m")
    assert c.layer_pattern == "3" * 24 and c.d_model == 768 and c.mamba3_cfg["d_state"] == 128
    assert ModelConfig.from_name("mamba3-1.3b").d_model == 2048
    m = LanguageModel(ModelConfig.from_name("tiny-mamba3-mimo"))
    assert m.backbone.layers[0].mixer.is_mimo and "Mamba-3" in m.config.describe()
