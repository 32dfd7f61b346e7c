"""Hugging Face Zamba2 (Mamba-2 layers and shared attention blocks): load, save, generate and train.

Parity as for the other hybrids (tests/models/test_hf_hybrids.py): tiny random models built with
``transformers`` give the same float32 logits and greedy tokens (a left-padded row included), and
ssmkit writes them back as the same tensors, bit for bit.
"""

import pytest
import torch

import ssmkit
from ssmkit.models.formats import hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.peer

VOCAB = 96


def _zamba2(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6,
                layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"], mamba_d_state=8,
                n_mamba_heads=8, mamba_ngroups=2, chunk_size=8, num_attention_heads=4, intermediate_size=48,
                num_mem_blocks=2, adapter_rank=4, pad_token_id=0)
    base.update(kw)
    return transformers.Zamba2Config(**base)


VARIANTS = {
    # two shared blocks used ABA, MLP adapters only, no RoPE, tied embeddings (the 2.7B layout)
    "abab": {},
    # one shared block, q/k/v adapters, RoPE, untied head, GQA-free (the 1.2B layout), SiLU gate
    "rope-adapters": dict(num_mem_blocks=1, use_shared_attention_adapter=True, use_mem_rope=True,
                          tie_word_embeddings=False, hidden_act="silu", add_bias_linear=True),
}


def tiny_hf(name: str):
    torch.manual_seed(0)
    model = transformers.Zamba2ForCausalLM(_zamba2(**VARIANTS[name])).eval()
    with torch.no_grad():  # move the parameters transformers initialises to constants off them
        for n, p in model.named_parameters():
            if n.endswith(("A_log", "D", "dt_bias")) or "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "adapter" in n:  # LoRA up-projections start at zero elsewhere; make them count
                p.normal_(0.0, 0.2)
        # transformers ties a later use's block to the first only with tied embeddings: make the
        # copies equal, as in a checkpoint whose blocks are shared
        cfg, layers = model.config, model.model.layers
        ids = cfg.hybrid_layer_ids
        for j in range(cfg.num_mem_blocks, len(ids)):
            layers[ids[j]].shared_transformer.load_state_dict(
                layers[ids[j % cfg.num_mem_blocks]].shared_transformer.state_dict())
    return model


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_zamba2_loads_generates_and_saves_back(tmp_path, name):
    ref = tiny_hf(name)
    ref.save_pretrained(tmp_path / "hf")
    m = ssmkit.from_pretrained(tmp_path / "hf")
    assert m.checkpoint_format == "hf" and m.config.hf_model_type == "zamba2"

    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = m(ids).logits[..., :VOCAB]
    scale = want.abs().max().item()
    assert scale > 1e-2
    assert (want - got).abs().max().item() <= 1e-5 * scale

    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    want_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    assert torch.equal(ssmkit.generate(m, ids, 8, attention_mask=mask), want_tokens)

    m.save_pretrained(tmp_path / "back", format="hf")
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_shared_block_is_one_tensor_and_each_use_has_its_own_kv_cache(tmp_path):
    tiny_hf("abab").save_pretrained(tmp_path)
    m = ssmkit.from_pretrained(tmp_path).train()
    blocks, layers = m.backbone.shared_blocks, m.backbone.layers
    assert len(blocks) == 2 and [blk.shared_use is not None for blk in layers] == [False, True, False, True, True, False]
    assert [layers[i].shared_use.block for i in (1, 3, 4)] == [0, 1, 0]
    names = [n for n, _ in m.named_parameters() if "attn.in_proj" in n]
    assert names == ["backbone.shared_blocks.0.attn.in_proj.weight", "backbone.shared_blocks.1.attn.in_proj.weight"]
    cache = ssmkit.inference.allocate_cache(m, 1, 32)
    kv = [cache.states[i].shared.k for i in (1, 3, 4)]
    assert len({t.data_ptr() for t in kv}) == 3  # uses 0 and 2 run block 0 with separate KV caches

    # training: the gradient of a shared weight sums over its uses
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# Zyphra/Zamba2-2.7B's config.json (transformers' Zamba2Config defaults are this model)
ZAMBA2_2_7B = {
    "model_type": "zamba2", "architectures": ["Zamba2ForCausalLM"], "hidden_size": 2560, "num_hidden_layers": 54,
    "layers_block_type": ["hybrid" if i in (6, 12, 18, 24, 30, 36, 42, 47, 51) else "mamba" for i in range(54)],
    "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_ngroups": 1, "n_mamba_heads": 80,
    "mamba_headdim": 64, "chunk_size": 256, "use_conv_bias": True, "add_bias_linear": False, "hidden_act": "gelu",
    "intermediate_size": 10240, "num_attention_heads": 32, "num_key_value_heads": 32, "kv_channels": 80,
    "num_mem_blocks": 2, "use_shared_attention_adapter": False, "use_shared_mlp_adapter": True, "adapter_rank": 128,
    "use_mem_rope": False, "rope_theta": 10000, "rms_norm_eps": 1e-5, "time_step_min": 0.001, "time_step_max": 0.1,
    "time_step_floor": 1e-4, "vocab_size": 32000, "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "use_long_context": False,
}


def test_published_zamba2_2_7b_structure():
    c = hf.to_model_config(ZAMBA2_2_7B)
    assert c.layer_pattern == "2" * 54 and c.mlp == "none" and c.tie_embeddings and c.padded_vocab_size == 32000
    sc = c.shared_cfg
    assert sc["layers"] == (6, 12, 18, 24, 30, 36, 42, 47, 51) and sc["n_blocks"] == 2
    assert (sc["n_heads"], sc["n_kv_heads"], sc["head_dim"], sc["rope_dim"]) == (32, 32, 160, 0)
    assert sc["softmax_scale"] == pytest.approx(80 ** -0.5)
    assert (sc["d_intermediate"], sc["activation"], sc["adapter_rank"], sc["attn_adapters"]) == (10240, "geglu", 128, False)
    m2 = c.mamba2_cfg
    assert (m2["d_state"], m2["headdim"], m2["ngroups"], m2["expand"], m2["dt_limit"]) == (64, 64, 1, 2, (0.001, float("inf")))
    # transformers' defaults are this model's structure
    t = transformers.Zamba2Config(num_mem_blocks=2, n_mamba_heads=80, intermediate_size=10240)
    assert hf.to_model_config(t.to_dict()).to_dict() == c.to_dict()
    with torch.device("meta"):  # the layout, without allocating 2.7B parameters
        m = ssmkit.LanguageModel(c)
    blk = m.backbone.shared_blocks[0]
    assert tuple(blk.attn.in_proj.weight.shape) == (3 * 5120, 5120) and tuple(blk.attn.out_proj.weight.shape) == (2560, 5120)
    assert tuple(blk.mlp.fc1.weight.shape) == (2 * 10240, 2560)
    assert m.backbone.layers[6].shared_use.mlp_lora.up.weight.shape == (2 * 10240, 128)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(2.66e9, rel=0.02)


@pytest.mark.parametrize("cfg, match", [
    ({**ZAMBA2_2_7B, "hidden_act": "relu"}, "hidden_act='relu'"),
    ({**ZAMBA2_2_7B, "use_long_context": True}, "use_long_context=True"),
    ({**ZAMBA2_2_7B, "layers_block_type": ["mamba"] * 53 + ["attention"]}, "layers_block_type"),
    ({**ZAMBA2_2_7B, "num_mem_blocks": 10}, "num_mem_blocks=10"),
    ({**ZAMBA2_2_7B, "use_shared_attention_adapter": True, "num_key_value_heads": 8}, "use_shared_attention_adapter"),
    ({**ZAMBA2_2_7B, "use_mem_rope": True, "rope_scaling": {"type": "yarn"}}, "rope type 'yarn'"),
])
def test_unsupported_zamba2_variants_are_refused_with_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        hf.to_model_config(cfg)


def test_checkpoint_with_unshared_blocks_is_refused(tmp_path):
    # transformers keeps a block per use with untied embeddings; random ones are not shared
    transformers.Zamba2ForCausalLM(_zamba2(tie_word_embeddings=False)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.4\.shared_transformer\..* differs"):
        ssmkit.from_pretrained(tmp_path)


@pytest.mark.parametrize("fmt", ["mamba_ssm", "gguf"])
def test_formats_without_shared_blocks_refuse_them(tmp_path, fmt):
    cfg = hf.to_model_config({**ZAMBA2_2_7B, "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64,
                              "layers_block_type": ["mamba", "hybrid"], "num_mem_blocks": 1, "n_mamba_heads": 4,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 48,
                              "adapter_rank": 4})
    with pytest.raises(ValueError, match="shared_cfg"):
        ssmkit.LanguageModel(cfg).save_pretrained(tmp_path / "out", format=fmt)
