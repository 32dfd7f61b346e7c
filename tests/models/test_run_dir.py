"""from_pretrained on a run directory of `ssmkit train`: its model files, or the newest readable
training checkpoint when it has none."""

import pytest
import torch

import ssmkit
from ssmkit.models.checkpoint import CheckpointError
from ssmkit.training import checkpoint as ckpt
from ssmkit.training.rundir import save_model


def _model(seed):
    torch.manual_seed(seed)
    return ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba"))


def test_newest_checkpoint_and_fallback(tmp_path):
    old, new = _model(1), _model(2)
    for step, m in ((10, old), (20, new)):
        ckpt.save_checkpoint(tmp_path, step, {"model": m.state_dict(), "model_config": m.config.to_dict()})
    got = ssmkit.from_pretrained(tmp_path)
    torch.testing.assert_close(got.state_dict(), new.state_dict(), rtol=0, atol=0)
    ckpt.checkpoint_path(tmp_path, 20).write_bytes(b"truncated")
    got = ssmkit.from_pretrained(tmp_path)
    torch.testing.assert_close(got.state_dict(), old.state_dict(), rtol=0, atol=0)
    ckpt.checkpoint_path(tmp_path, 10).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no loadable model") as e:
        ssmkit.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_model_files_of_the_run_are_preferred(tmp_path):
    old, new = _model(1), _model(2)
    ckpt.save_checkpoint(tmp_path, 10, {"model": old.state_dict(), "model_config": old.config.to_dict()})
    save_model(tmp_path, new.config.to_dict(), new.state_dict())
    got = ssmkit.from_pretrained(tmp_path)
    assert got.checkpoint_format == "ssmkit"
    torch.testing.assert_close(got.state_dict(), new.state_dict(), rtol=0, atol=0)
