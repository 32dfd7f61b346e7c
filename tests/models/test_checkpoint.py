"""Checkpoints: round trips in every format, mamba_ssm files, malformed checkpoints, atomic writes,
Hub repo ids offline."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import ssmkit
from ssmkit import LanguageModel, ModelConfig
from ssmkit.models.checkpoint import CheckpointError, atomic_write


def tiny(pattern="MM", **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=len(pattern), vocab_size=50, layer_pattern=pattern, ssm_cfg={"d_state": 4},
               mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4}, attn_cfg={"n_heads": 2})
    cfg.update(kw)
    return LanguageModel(ModelConfig(**cfg)).eval()


def same_logits(a, b):
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("fmt, pattern, kw", [
    ("ssmkit", "MA2D", {"mlp": "moe", "d_intermediate": 32, "moe_cfg": {"n_experts": 2, "top_k": 1}}),
    ("hf", "MM", {}),
    ("hf", "22", {"tie_embeddings": False}),
    ("mamba_ssm", "MAM", {"mlp": "swiglu", "d_intermediate": 32}),
    ("mamba_ssm", "22", {}),
    ("mamba_ssm", "MM", {"rms_norm": False, "tie_embeddings": False}),
])
def test_round_trip(tmp_path, fmt, pattern, kw):
    m = tiny(pattern, **kw)
    m.save_pretrained(tmp_path, format=fmt)
    files = sorted(os.listdir(tmp_path))
    assert files == (["config.json", "pytorch_model.bin"] if fmt == "mamba_ssm" else ["config.json", "model.safetensors"])
    m2 = ssmkit.from_pretrained(tmp_path)
    assert m2.checkpoint_format == fmt
    assert m2.config.layer_pattern == pattern
    assert same_logits(m, m2)


def test_mamba_ssm_files(tmp_path):
    m = tiny("MAM")
    m.save_pretrained(tmp_path, format="mamba_ssm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba1" and cfg["attn_layer_idx"] == [1] and cfg["d_intermediate"] == 0
    assert cfg["attn_cfg"]["num_heads"] == 2 and "model_type" not in cfg
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd
    # mamba_ssm checkpoints re-saved as safetensors are accepted too
    sd.pop("lm_head.weight")
    os.unlink(tmp_path / "pytorch_model.bin")
    save_file(sd, tmp_path / "model.safetensors")
    assert same_logits(m, ssmkit.from_pretrained(tmp_path))


def test_mamba_ssm_config_defaults(tmp_path):
    """A hand-written mamba_ssm config (MHA defaults: no RoPE, biases on; Mamba2 layer)."""
    cfg = {"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba2", "d_state": 8,
           "headdim": 16}, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}, "d_intermediate": 0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = ssmkit.models.formats.mamba_ssm.to_model_config(cfg)
    assert c.layer_pattern == "2A" and c.padded_vocab_size == 56
    m = LanguageModel(c)
    assert m.backbone.layers[1].mixer.rope_dim == 0 and m.backbone.layers[1].mixer.in_proj.bias is not None


def test_formats_refuse_models_they_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="Hugging Face format.*mixes layer kinds"):
        tiny("MA").save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="mamba_ssm format.*D"):
        tiny("MD").save_pretrained(tmp_path, format="mamba_ssm")
    with pytest.raises(ValueError, match="use_gate"):
        tiny("MM", ssm_cfg={"use_gate": False}).save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="format must be one of"):
        tiny().save_pretrained(tmp_path, format="onnx")
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    m = tiny("MM")
    m.save_pretrained(tmp_path, format="ssmkit")
    return tmp_path


def _rewrite(d, fn):
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupted"):
        ssmkit.from_pretrained(saved)


def test_truncated_torch_bin(tmp_path):
    tiny("MM").save_pretrained(tmp_path, format="mamba_ssm")
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*truncated or corrupted"):
        ssmkit.from_pretrained(tmp_path)


def test_wrong_shape_names_the_tensor(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("backbone.layers.1.mixer.A_log", torch.zeros(3, 4)))
    with pytest.raises(CheckpointError, match=r"'backbone.layers.1.mixer.A_log' has shape \(3, 4\).*expects"):
        ssmkit.from_pretrained(saved)


def test_missing_tensor_names_it(saved):
    _rewrite(saved, lambda sd: sd.pop("backbone.layers.0.mixer.D"))
    with pytest.raises(CheckpointError, match="missing tensor 'backbone.layers.0.mixer.D'"):
        ssmkit.from_pretrained(saved)


def test_extra_tensor_names_it(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("backbone.layers.0.mixer.surprise", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'backbone.layers.0.mixer.surprise'"):
        ssmkit.from_pretrained(saved)


def test_config_that_does_not_match_the_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_layer"], cfg["layer_pattern"] = 1, "M"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensor 'backbone.layers.1.*config.json match"):
        ssmkit.from_pretrained(saved)
    cfg["n_layer"], cfg["layer_pattern"], cfg["d_model"] = 2, "MM", 48
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        ssmkit.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        ssmkit.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a recognised checkpoint"):
        ssmkit.from_pretrained(saved)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickle_needing_code_execution_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny("MM").save_pretrained(tmp_path, format="mamba_ssm")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"backbone.embedding.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load: the pickle needs code execution"):
        ssmkit.from_pretrained(tmp_path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.safetensors"]


def test_stale_weights_of_another_kind_are_removed(tmp_path):
    a, b = tiny("MM"), tiny("MM", vocab_size=40)
    a.save_pretrained(tmp_path, format="ssmkit")
    b.save_pretrained(tmp_path, format="mamba_ssm")
    assert not (tmp_path / "model.safetensors").exists()
    assert ssmkit.from_pretrained(tmp_path).config.vocab_size == 40


@pytest.mark.peer
def test_hub_repo_id_offline_gives_a_clear_message(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(CheckpointError, match="offline.*`hf download state-spaces/mamba-130m"):
        ssmkit.from_pretrained("state-spaces/mamba-130m")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        ssmkit.from_pretrained("./does/not/exist")


def test_dtype_options(saved):
    assert ssmkit.from_pretrained(saved, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert ssmkit.from_pretrained(saved, dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        ssmkit.from_pretrained(saved, dtype="int8")


def test_saved_files_get_normal_permissions(tmp_path):
    tiny("MM").save_pretrained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_hf_config_writes_infinity_as_a_number(tmp_path):
    """Mamba-2's time_step_limit (0, inf) is written as plain JSON numbers, which transformers 4.x
    and 5.x both read (5.x's own {"__float__": ...} tag is read back too, not written)."""
    import math

    tiny("22").save_pretrained(tmp_path, format="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["time_step_limit"] == [0.0, math.inf]
