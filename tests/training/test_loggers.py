"""Optional metric logging: TensorBoard event files, W&B offline runs, one clear error without the package."""

import importlib.util

import pytest

from ssmkit.tasks import SelectiveCopying
from ssmkit.training import TrainConfig, Trainer
from ssmkit.training.loggers import check_available
from tests.training.tiny_models import TinyRNN


def _train(tmp_path, log):
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, progress=False, device="cpu", log_every=1,
                      eval_batches=1, out_dir=str(tmp_path), log=log)
    tr = Trainer(TinyRNN(task.vocab_size), task, cfg)
    tr.train()
    tr.close()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_writes_event_files(tmp_path):
    _train(tmp_path, "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert "eval/eval/acc" in events.Tags()["scalars"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _train(tmp_path, "wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"^--log wandb: the wandb package is not installed \(pip install 'ssmkit\[wandb\]'\)$"):
        check_available("wandb")
    with pytest.raises(ValueError, match="log must be"):
        TrainConfig(log="mlflow")
