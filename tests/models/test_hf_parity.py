"""Parity with Hugging Face transformers: HF -> ssmkit and ssmkit -> HF, logits and greedy tokens."""


import pytest
import torch

import ssmkit

transformers = pytest.importorskip("transformers")


def tiny_hf(kind: str, n_groups: int = 1):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2,
                                       expand=2, conv_kernel=4, time_step_rank=4)
        return transformers.MambaForCausalLM(cfg).eval()
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                                    head_dim=16, num_heads=4, n_groups=n_groups, chunk_size=8, conv_kernel=4)
    return transformers.Mamba2ForCausalLM(cfg).eval()


def hf_groups_the_gated_norm(hf) -> bool:
    """Whether this transformers version normalises Mamba-2's gated norm per group (as mamba_ssm
    does), told from what the model's norm computes, not from a class name."""
    norm = hf.backbone.layers[0].mixer.norm
    d = norm.weight.numel()
    x = torch.cat([torch.ones(1, d // 2), 3 * torch.ones(1, d // 2)], -1)  # groups with different scales
    with torch.no_grad():
        y = norm(x) / norm.weight
    return bool(torch.allclose(y, torch.ones_like(y), atol=1e-3))


@pytest.mark.parametrize("kind, n_groups", [("mamba", 1), ("mamba2", 1), ("mamba2", 2)])
def test_hf_checkpoint_loads_with_same_logits_and_generations(tmp_path, kind, n_groups):
    hf = tiny_hf(kind, n_groups)
    if n_groups > 1 and not hf_groups_the_gated_norm(hf):
        pytest.skip(f"transformers {transformers.__version__} normalises Mamba-2's gated norm over all of "
                    "d_inner, ignoring n_groups (mamba_ssm, ssmkit's reference, normalises per group)")
    hf.save_pretrained(tmp_path / "hf")
    m = ssmkit.from_pretrained(tmp_path / "hf")
    assert m.checkpoint_format == "hf"
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        got = m(ids).logits
    assert ref.abs().max() > 1e-3  # not a degenerate comparison
    assert (ref - got).abs().max().item() <= 1e-4
    g_hf = hf.generate(ids[:, :5], max_new_tokens=8, do_sample=False, attention_mask=torch.ones(2, 5, dtype=torch.long),
                       pad_token_id=0)
    assert torch.equal(g_hf, ssmkit.generate(m, ids[:, :5], 8))

    # ... and back: ssmkit writes a checkpoint transformers loads with the same logits.
    m.save_pretrained(tmp_path / "back", format="hf")
    cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.Mamba2ForCausalLM
    hf2 = cls.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (hf2(ids).logits - got).abs().max().item() <= 1e-4


def test_ssmkit_model_saved_as_hf_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig(d_model=32, n_layer=2, vocab_size=60, ssm_cfg={"d_state": 4})).eval()
    m.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 60, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - m(ids).logits).abs().max().item() <= 1e-4


def test_sharded_hf_checkpoint(tmp_path):
    hf = tiny_hf("mamba")
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = ssmkit.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert (hf(ids).logits - m(ids).logits).abs().max().item() <= 1e-4
