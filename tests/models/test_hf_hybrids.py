"""Hugging Face hybrids (Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1, Jamba, Qwen3-Next): load, save, generate
and train.

Parity: tiny random models built with ``transformers`` (float32, CPU) give the same logits in
ssmkit (float32 noise: relative error <= 1e-5 of the largest logit) and the same greedy tokens with
left padding; ssmkit writes them back as the same tensors, bit for bit, and transformers reads them.
"""

import json

import pytest
import torch

import ssmkit
from ssmkit.models.formats import hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.peer

VOCAB = 96


def _bamba():
    return transformers.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=8,
        mamba_n_groups=2, pad_token_id=0)


def _granite(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, shared_intermediate_size=40,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=8,
                mamba_n_groups=2, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.3, rms_norm_eps=1e-5,
                tie_word_embeddings=True, pad_token_id=0)
    base.update(kw)
    return transformers.GraniteMoeHybridConfig(**base)


def _nemotron():
    # head_dim * heads != hidden_size and mamba heads * head_dim = 2.25 * hidden_size, as in
    # Nemotron Nano 2 (hidden 4480, 40 x 128 attention, 128 x 80 Mamba-2)
    return transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, hybrid_override_pattern="M-*-MM",
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, mamba_num_heads=6, mamba_head_dim=12,
        ssm_state_size=8, n_groups=2, chunk_size=8, pad_token_id=0)


def _falcon_h1(**kw):
    # as Falcon-H1-0.5B: head_dim * heads != hidden_size, mamba_d_ssm != mamba_expand * hidden_size,
    # every µP multiplier away from 1
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8,
                mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8, key_multiplier=0.39,
                attention_in_multiplier=1.5, attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
                ssm_out_multiplier=1.7, ssm_multipliers=[0.35, 0.25, 0.35, 0.5, 0.35], mlp_multipliers=[0.88, 0.59],
                embedding_multiplier=5.66, lm_head_multiplier=0.0390625, rope_parameters={"rope_type": "default",
                "rope_theta": 1e11}, pad_token_id=0)
    base.update(kw)
    return transformers.FalconH1Config(**base)


def _jamba(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=4, pad_token_id=0)
    base.update(kw)
    return transformers.JambaConfig(**base)


def _qwen3_next(**kw):
    # more linear value heads than key heads, value head size != key head size, partial RoPE
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=24,
                shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2, full_attention_interval=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                pad_token_id=0)
    base.update(kw)
    return transformers.Qwen3NextConfig(**base)


FAMILIES = {
    "bamba": (_bamba, "BambaForCausalLM"),
    "granite-moe": (_granite, "GraniteMoeHybridForCausalLM"),
    "granite-dense-rope": (lambda: _granite(num_local_experts=0, num_experts_per_tok=0,
                                            position_embedding_type="rope", tie_word_embeddings=False),
                           "GraniteMoeHybridForCausalLM"),
    "nemotron-h": (_nemotron, "NemotronHForCausalLM"),
    "falcon-h1": (_falcon_h1, "FalconH1ForCausalLM"),
    "falcon-h1-gated-norm": (lambda: _falcon_h1(mamba_rms_norm=True, mamba_norm_before_gate=False,
                                                tie_word_embeddings=True), "FalconH1ForCausalLM"),
    "jamba": (_jamba, "JambaForCausalLM"),
    "jamba-dense": (lambda: _jamba(num_experts=1, attn_layer_period=4, attn_layer_offset=2, mamba_proj_bias=True,
                                   tie_word_embeddings=True), "JambaForCausalLM"),
    "qwen3-next": (_qwen3_next, "Qwen3NextForCausalLM"),
    "qwen3-next-dense": (lambda: _qwen3_next(num_experts=0, num_hidden_layers=3, attention_bias=True,
                                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                                             linear_value_head_dim=8, tie_word_embeddings=True),
                         "Qwen3NextForCausalLM"),
}


def tiny_hf(name: str):
    make, cls = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(make()).eval()
    with torch.no_grad():  # move the parameters transformers initialises to constants off them
        for n, p in model.named_parameters():
            if n.endswith(("A_log", "D", "dt_bias")) or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif "experts" in n or "router" in n or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 0.3)
    return model


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_hybrid_loads_generates_and_saves_back(tmp_path, name):
    ref = tiny_hf(name)
    ref.save_pretrained(tmp_path / "hf")
    m = ssmkit.from_pretrained(tmp_path / "hf")
    assert m.checkpoint_format == "hf" and m.config.hf_model_type == ref.config.model_type

    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = m(ids).logits[..., :VOCAB]
    scale = want.abs().max().item()
    assert scale > 1e-2  # not a degenerate comparison
    assert (want - got).abs().max().item() <= 1e-5 * scale

    # greedy decoding with a left-padded row: the cache / step contract of native models
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    want_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    assert torch.equal(ssmkit.generate(m, ids, 8, attention_mask=mask), want_tokens)

    # ... and back: the same tensors, bit for bit, which transformers reads with the same logits
    m.save_pretrained(tmp_path / "back", format="hf")
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("name", ["jamba", "qwen3-next"])
def test_loads_transformers_in_memory_expert_names(name):
    """transformers 5 packs the experts in memory (``experts.gate_up_proj`` as [gate; up], ``down_proj``)."""
    ref = tiny_hf(name)
    sd = ref.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    config = hf.to_model_config(ref.config.to_dict())
    m = ssmkit.LanguageModel(config).eval()
    m.load_state_dict(hf.state_dict_in(sd, config))
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        assert (want - m(ids).logits).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("name", ["granite-moe", "qwen3-next"])
def test_imported_hybrid_trains(tmp_path, name):
    tiny_hf(name).save_pretrained(tmp_path)
    m = ssmkit.from_pretrained(tmp_path).train()
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = m(ids, labels=ids)
        (out.loss + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert m(ids, labels=ids, return_logits=False).loss.item() == pytest.approx(
        m(ids, labels=ids).loss.item(), rel=1e-5)  # the chunked loss path divides by logits_scaling too


def test_native_model_saves_as_the_family_that_holds_it(tmp_path):
    """A model built in ssmkit (no hf_model_type) is written as the first architecture that holds it."""
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=32, n_layer=4, vocab_size=64, layer_pattern="2FAF", mlp_cfg={"activation": "relu2"},
                             d_intermediate=40, mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8},
                             attn_cfg={"n_heads": 4, "n_kv_heads": 2, "rope_dim": 0}, tie_embeddings=False)
    m = ssmkit.LanguageModel(cfg).eval()
    m.save_pretrained(tmp_path, format="hf")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nemotron_h"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        want = back(ids).logits
        assert (want - m(ids).logits).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_native_parallel_model_saves_as_falcon_h1(tmp_path):
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=32, n_layer=2, vocab_size=64, layer_pattern="PP", mlp="swiglu", d_intermediate=40,
                             mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8, "in_multiplier": 0.5},
                             attn_cfg={"n_heads": 4, "n_kv_heads": 2, "key_multiplier": 0.7},
                             parallel_cfg={"ssm_out_multiplier": 1.5}, mlp_cfg={"down_multiplier": 0.8},
                             tie_embeddings=False)
    m = ssmkit.LanguageModel(cfg).eval()
    m.save_pretrained(tmp_path, format="hf")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "falcon_h1"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        want = back(ids).logits
        assert (want - m(ids).logits).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_native_gated_deltanet_model_saves_as_qwen3_next(tmp_path):
    torch.manual_seed(0)
    cfg = ssmkit.ModelConfig(d_model=32, n_layer=2, vocab_size=64, layer_pattern="GA", mlp="moe", norm_eps=1e-6,
                             moe_cfg={"n_experts": 4, "top_k": 2, "every": 1, "d_expert": 24, "d_shared": 16,
                                      "shared_gate": True},
                             deltanet_cfg={"num_heads": 2, "num_v_heads": 4, "head_dim": 8, "conv_bias": False,
                                           "norm_eps": 1e-6},
                             attn_cfg={"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "rope_dim": 4,
                                       "qk_norm": "zero_centred_rms", "output_gate": True},
                             zero_centred_norm=True, tie_embeddings=False)
    m = ssmkit.LanguageModel(cfg).eval()
    m.save_pretrained(tmp_path, format="hf")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_next"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        want = back(ids).logits
        assert (want - m(ids).logits).abs().max().item() <= 1e-5 * want.abs().max().item()
    with pytest.raises(ValueError, match="zero-centred"):
        ssmkit.LanguageModel(ssmkit.ModelConfig(**{**cfg.to_dict(), "zero_centred_norm": False,
                                                   "hf_model_type": "qwen3_next"})).save_pretrained(
            tmp_path / "no", format="hf")


@pytest.mark.parametrize("kw, match", [
    (dict(layer_pattern="2A", attn_cfg={"n_heads": 4, "key_multiplier": 0.5}), "key_multiplier"),
    (dict(layer_pattern="2A", attn_cfg={"n_heads": 4}, mlp_cfg={"gate_multiplier": 0.5}), "gate_multiplier"),
    (dict(layer_pattern="PP", attn_cfg={"n_heads": 4}, residual_multiplier=2.0), "residual_multiplier"),
])
def test_multipliers_no_architecture_holds_are_refused(tmp_path, kw, match):
    cfg = ssmkit.ModelConfig(d_model=32, n_layer=2, vocab_size=64, mlp="swiglu", d_intermediate=40,
                             mamba2_cfg={"d_state": 8, "headdim": 8}, **kw)
    with pytest.raises(ValueError, match=match):
        ssmkit.LanguageModel(cfg).save_pretrained(tmp_path, format="hf")


# ------------------------------------------------------------------------------------------------
# The published configurations (the values of their config.json; only the structure is built)
def test_published_bamba_9b_structure():
    cfg = transformers.BambaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_indices=[9, 18, 27], mamba_n_heads=128, mamba_d_head=64,
        mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False).to_dict()
    c = hf.to_model_config(cfg)
    assert c.layer_pattern == "".join("A" if i in (9, 18, 27) else "2" for i in range(32))
    assert (c.mlp, c.d_intermediate, c.tie_embeddings, c.padded_vocab_size) == ("swiglu", 14336, False, 128256)
    assert c.attn_cfg == {"n_heads": 32, "n_kv_heads": 8, "rope_dim": 64, "rope_theta": 10000.0,
                          "qkv_bias": False, "out_bias": False}
    assert {k: c.mamba2_cfg[k] for k in ("d_state", "headdim", "ngroups", "expand", "chunk_size")} == \
        {"d_state": 128, "headdim": 64, "ngroups": 1, "expand": 2, "chunk_size": 256}
    assert "d_inner" not in c.mamba2_cfg and hf.from_model_config(c)["attn_layer_indices"] == [9, 18, 27]


GRANITE_4_H_TINY = {  # ibm-granite/granite-4.0-h-tiny (as published: legacy key spellings)
    "model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"], "hidden_size": 1536,
    "num_hidden_layers": 40, "layer_types": ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
    "num_attention_heads": 12, "num_key_value_heads": 4, "attention_multiplier": 0.0078125,
    "position_embedding_type": "nope", "rope_theta": 10000, "rope_scaling": None, "embedding_multiplier": 12,
    "residual_multiplier": 0.22, "logits_scaling": 6, "num_local_experts": 64, "num_experts_per_tok": 6,
    "intermediate_size": 512, "shared_intermediate_size": 1024, "mamba_n_heads": 48, "mamba_d_head": 64,
    "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_expand": 2, "mamba_d_conv": 4, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-5, "normalization_function": "rmsnorm",
    "hidden_act": "silu", "tie_word_embeddings": True, "vocab_size": 100352, "eos_token_id": 100257,
    "bos_token_id": 100257, "pad_token_id": 100256,
}


def test_published_granite_4_h_structure():
    c = hf.to_model_config(GRANITE_4_H_TINY)
    assert c.layer_pattern.count("A") == 4 and c.layer_pattern[5] == "A" and len(c.layer_pattern) == 40
    assert (c.mlp, c.d_intermediate, c.moe_layers()) == ("moe", 512, list(range(40)))
    assert c.moe_cfg == {"n_experts": 64, "top_k": 6, "every": 1, "d_shared": 1024}
    assert (c.embedding_multiplier, c.residual_multiplier, c.logits_scaling) == (12.0, 0.22, 6.0)
    assert c.attn_cfg["rope_dim"] == 0 and c.attn_cfg["softmax_scale"] == 0.0078125 and c.tie_embeddings
    assert c.mamba2_cfg["headdim"] == 64 and c.mamba2_cfg["expand"] == 2 and "d_inner" not in c.mamba2_cfg
    # transformers reads the same file to the same architecture ...
    t = transformers.GraniteMoeHybridConfig(**{k: v for k, v in GRANITE_4_H_TINY.items() if k != "model_type"})
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    # ... and the dense micro variant (no experts) is one shared SwiGLU MLP per layer
    micro = hf.to_model_config({**GRANITE_4_H_TINY, "num_local_experts": 0, "num_experts_per_tok": 0,
                                "shared_intermediate_size": 8192})
    assert (micro.mlp, micro.d_intermediate) == ("swiglu", 8192)


NEMOTRON_NANO_9B_V2 = {  # nvidia/NVIDIA-Nemotron-Nano-9B-v2
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hidden_size": 4480,
    "num_hidden_layers": 56, "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 15680,
    "mlp_hidden_act": "relu2", "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128, "n_groups": 8,
    "conv_kernel": 4, "chunk_size": 128, "expand": 2, "use_conv_bias": True, "use_bias": False,
    "layer_norm_epsilon": 1e-5, "residual_in_fp32": False, "attention_bias": False, "vocab_size": 131072,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 12, "pad_token_id": 0,
}


def test_published_nemotron_h_structure():
    c = hf.to_model_config(NEMOTRON_NANO_9B_V2)
    pat = NEMOTRON_NANO_9B_V2["hybrid_override_pattern"]
    assert c.layer_pattern == pat.replace("M", "2").replace("*", "A").replace("-", "F") and c.n_layer == 56
    assert (c.layer_pattern.count("2"), c.layer_pattern.count("A"), c.layer_pattern.count("F")) == (27, 4, 25)
    assert c.mamba2_cfg["d_inner"] == 10240 and c.mamba2_cfg["ngroups"] == 8 and c.mamba2_cfg["headdim"] == 80
    assert c.attn_cfg == {"n_heads": 40, "n_kv_heads": 8, "head_dim": 128, "rope_dim": 0}
    assert (c.mlp, c.d_intermediate, c.mlp_cfg) == ("none", 15680, {"activation": "relu2"})
    t = transformers.NemotronHConfig(**{k: v for k, v in NEMOTRON_NANO_9B_V2.items() if k != "model_type"})
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    # the Mamba-2 layer is built with its 128 heads of 80 (without allocating the 9B model)
    with torch.device("meta"):
        mixer = ssmkit.LanguageModel(ssmkit.ModelConfig(**{**c.to_dict(), "n_layer": 1,
                                                           "layer_pattern": "2"})).backbone.layers[0].mixer
    assert (mixer.nheads, mixer.headdim, mixer.d_inner, tuple(mixer.in_proj.weight.shape)) == \
        (128, 80, 10240, (2 * 10240 + 2 * 8 * 128 + 128, 4480))


FALCON_H1_0_5B = {  # tiiuae/Falcon-H1-0.5B-Instruct
    "model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 36,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 2048,
    "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
    "mamba_expand": 2, "mamba_d_conv": 4, "mamba_chunk_size": 128, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "projectors_bias": False, "mamba_rms_norm": False, "mamba_norm_before_gate": False, "rope_theta": 1e11,
    "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "hidden_act": "silu", "vocab_size": 32784,
    "embedding_multiplier": 5.656854249492381, "lm_head_multiplier": 0.0390625, "key_multiplier": 0.390625,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.23570226039551587, "mlp_multipliers": [0.8838834764831844, 0.5859375],
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 11, "pad_token_id": 0,
}


def test_published_falcon_h1_structure():
    c = hf.to_model_config(FALCON_H1_0_5B)
    assert c.layer_pattern == "P" * 36 and (c.mlp, c.d_intermediate) == ("swiglu", 2048)
    assert c.attn_cfg == {"n_heads": 8, "n_kv_heads": 2, "head_dim": 64, "rope_theta": 1e11, "qkv_bias": False,
                          "out_bias": False, "key_multiplier": 0.390625}
    assert c.mamba2_cfg["d_inner"] == 1536 and c.mamba2_cfg["headdim"] == 64 and c.mamba2_cfg["rmsnorm"] is False
    assert c.mamba2_cfg["in_multiplier"] == 1.25 and c.mamba2_cfg["in_proj_multipliers"][3] == 0.5
    assert c.parallel_cfg == {"attn_out_multiplier": 0.9375, "ssm_out_multiplier": 0.23570226039551587}
    assert c.mlp_cfg == {"gate_multiplier": 0.8838834764831844, "down_multiplier": 0.5859375}
    assert (c.embedding_multiplier, c.logits_scaling, c.eos_token_id) == (5.656854249492381, 25.6, 11)
    t = transformers.FalconH1Config(**{k: v for k, v in FALCON_H1_0_5B.items() if k not in ("model_type", "rope_theta")},
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e11})
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    assert hf.from_model_config(c)["lm_head_multiplier"] == 0.0390625
    with torch.device("meta"):
        mixer = ssmkit.LanguageModel(ssmkit.ModelConfig(**{**c.to_dict(), "n_layer": 1,
                                                           "layer_pattern": "P"})).backbone.layers[0].mixer
    assert tuple(mixer.mamba.in_proj.weight.shape) == (2 * 1536 + 2 * 128 + 24, 1024)
    assert tuple(mixer.attn.in_proj.weight.shape) == (64 * (8 + 2 * 2), 1024)


JAMBA_1_5_MINI = {  # ai21labs/AI21-Jamba-1.5-Mini
    "model_type": "jamba", "architectures": ["JambaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "attn_layer_period": 8,
    "attn_layer_offset": 4, "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 16,
    "num_experts_per_tok": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "vocab_size": 65536, "tie_word_embeddings": False, "sliding_window": None, "use_mamba_kernels": True,
    "bos_token_id": 1, "eos_token_id": [2, 518], "pad_token_id": 0,
}


def test_published_jamba_structure():
    c = hf.to_model_config(JAMBA_1_5_MINI)
    assert c.layer_pattern == "".join("A" if i % 8 == 4 else "M" for i in range(32))
    assert (c.mlp, c.d_intermediate, c.moe_layers()) == ("moe", 14336, list(range(1, 32, 2)))
    assert c.moe_cfg == {"n_experts": 16, "top_k": 2, "every": 2, "offset": 1, "normalize_top_k": False}
    assert c.ssm_cfg == {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": 256, "conv_bias": True, "bias": False,
                         "inner_norms": True, "inner_norm_eps": 1e-6}
    assert c.attn_cfg == {"n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "rope_dim": 0} and c.eos_token_id == 2
    t = transformers.JambaConfig(**{k: v for k, v in JAMBA_1_5_MINI.items() if k not in ("model_type", "sliding_window")})
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    out = hf.from_model_config(c)
    assert {k: out[k] for k in ("attn_layer_period", "attn_layer_offset", "expert_layer_period",
                                "expert_layer_offset")} == {"attn_layer_period": 8, "attn_layer_offset": 4,
                                                            "expert_layer_period": 2, "expert_layer_offset": 1}
    with torch.device("meta"):
        mixer = ssmkit.LanguageModel(ssmkit.ModelConfig(**{**c.to_dict(), "n_layer": 1, "layer_pattern": "M",
                                                           "mlp": "swiglu"})).backbone.layers[0].mixer
    assert tuple(mixer.x_proj.weight.shape) == (256 + 2 * 16, 8192) and mixer.dt_layernorm.weight.shape == (256,)


QWEN3_NEXT_80B_A3B = {  # Qwen/Qwen3-Next-80B-A3B-Instruct
    "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
    "full_attention_interval": 4, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": None, "attention_bias": False,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "intermediate_size": 5120, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": 151936,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_published_qwen3_next_structure():
    c = hf.to_model_config(QWEN3_NEXT_80B_A3B)
    assert c.layer_pattern == "GGGA" * 12 and c.zero_centred_norm and c.norm_eps == 1e-6
    assert (c.mlp, c.moe_layers()) == ("moe", list(range(48)))
    assert c.moe_cfg == {"n_experts": 512, "top_k": 10, "every": 1, "d_expert": 512, "d_shared": 512,
                         "shared_gate": True, "normalize_top_k": True}
    assert c.attn_cfg == {"n_heads": 16, "n_kv_heads": 2, "head_dim": 256, "rope_dim": 64, "rope_theta": 1e7,
                          "qkv_bias": False, "out_bias": False, "qk_norm": "zero_centred_rms", "qk_norm_eps": 1e-6,
                          "output_gate": True}
    assert c.deltanet_cfg == {"num_heads": 16, "num_v_heads": 32, "head_dim": 128, "expand_v": 1, "conv_size": 4,
                              "conv_bias": False, "norm_eps": 1e-6, "use_output_gate": True}
    # transformers reads the same file (its class defaults besides rope_theta) to the same architecture ...
    t = transformers.Qwen3NextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e7},
                                     intermediate_size=5120, bos_token_id=151643, eos_token_id=151645)
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    assert hf.to_model_config(hf.from_model_config(c)).to_dict() == c.to_dict()
    # ... and the layers have the checkpoint's shapes (built on the meta device, one layer each)
    with torch.device("meta"):
        m = ssmkit.LanguageModel(ssmkit.ModelConfig(**{**c.to_dict(), "n_layer": 2, "layer_pattern": "GA",
                                                       "moe_cfg": {**c.moe_cfg, "n_experts": 16}}))
        sd = hf.state_dict_out(m.state_dict(), m.config)
        hf_layers = [transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextDecoderLayer(
            transformers.Qwen3NextConfig(num_experts=16, num_hidden_layers=2, layer_types=[k, k]), 0)
            for k in ("linear_attention", "full_attention")]
    for i, layer in enumerate(hf_layers):
        want = {k: tuple(v.shape) for k, v in layer.state_dict().items() if "experts" not in k}
        assert {k: want[k] for k in want} == {k: tuple(sd[f"model.layers.{i}.{k}"].shape) for k in want}
    assert tuple(sd["model.layers.0.mlp.experts.15.gate_proj.weight"].shape) == (512, 2048)


@pytest.mark.parametrize("cfg, match", [
    ({**QWEN3_NEXT_80B_A3B, "decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({**QWEN3_NEXT_80B_A3B, "mlp_only_layers": [0]}, "mlp_only_layers"),
    ({**QWEN3_NEXT_80B_A3B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({**QWEN3_NEXT_80B_A3B, "linear_num_value_heads": 24}, "linear_num_value_heads=24"),
    ({**QWEN3_NEXT_80B_A3B, "layer_types": ["linear_attention"] * 47 + ["sliding_attention"]}, "layer_types"),
    ({**JAMBA_1_5_MINI, "sliding_window": 4096}, "sliding_window=4096"),
    ({**JAMBA_1_5_MINI, "attn_layer_offset": 8}, "attn_layer_offset=8"),
    ({**FALCON_H1_0_5B, "projectors_bias": True}, "projectors_bias=True"),
    ({**FALCON_H1_0_5B, "mamba_n_heads": 25}, "mamba_n_heads=25"),
    ({**FALCON_H1_0_5B, "ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers"),
    ({**NEMOTRON_NANO_9B_V2, "hybrid_override_pattern": "ME*"}, "mixture-of-experts layers"),
    ({**NEMOTRON_NANO_9B_V2, "mlp_hidden_act": "gelu"}, "mlp_hidden_act='gelu'"),
    ({**NEMOTRON_NANO_9B_V2, "attention_bias": True}, "attention_bias=True"),
    ({**GRANITE_4_H_TINY, "position_embedding_type": "alibi"}, "position_embedding_type='alibi'"),
    ({**GRANITE_4_H_TINY, "layer_types": ["mamba"] * 39 + ["conv"]}, "layer_types"),
    ({**GRANITE_4_H_TINY, "position_embedding_type": "rope", "rope_scaling": {"type": "yarn"}}, "rope type 'yarn'"),
    ({"model_type": "bamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 9, "hidden_act": "gelu"},
     "hidden_act='gelu'"),
])
def test_unsupported_variants_are_refused_with_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        hf.to_model_config(cfg)


def test_model_no_family_holds_is_refused(tmp_path):
    cfg = ssmkit.ModelConfig(d_model=32, n_layer=2, vocab_size=64, layer_pattern="2A", mlp="swiglu",
                             d_intermediate=40, mamba2_cfg={"d_state": 8, "headdim": 8}, attn_cfg={"n_heads": 4},
                             embedding_multiplier=2.0, hf_model_type="bamba")
    with pytest.raises(ValueError, match="as Hugging Face bamba: Bamba has no embedding"):
        ssmkit.LanguageModel(cfg).save_pretrained(tmp_path, format="hf")
    assert not (tmp_path / "config.json").exists()
