"""Run directories: never mixed, never silently resumed from nothing; SIGTERM/SIGINT save a checkpoint;
the final checkpoint is written whenever out_dir is set."""

import os
import signal

import pytest
import torch

from ssmkit.tasks import SelectiveCopying
from ssmkit.training import TrainConfig, Trainer
from ssmkit.training import checkpoint as ckpt
from ssmkit.training.rundir import prepare, run_files
from ssmkit.training.trainer import TrainingInterrupted
from tests.training.tiny_models import TinyRNN


def test_prepare_refuses_another_run_and_force_removes_only_its_files(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, {"x": torch.zeros(1)})
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a training run"):
        prepare(tmp_path)
    assert len(run_files(tmp_path)) == 2
    prepare(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    prepare(tmp_path)  # nothing of a run left: fine


def test_prepare_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist, so there is nothing to resume"):
        prepare(tmp_path / "nope", resume=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        prepare(tmp_path, resume=True)
    with pytest.raises(ValueError, match="contradict"):
        prepare(tmp_path, resume=True, force=True)


class SignalAt(SelectiveCopying):
    """Sends ``sig`` to this process while sampling the batch of step ``at``."""

    def __init__(self, sig, at, **kw):
        super().__init__(**kw)
        self.sig, self.at, self.calls = sig, at, 0

    def sample(self, batch_size, generator):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return super().sample(batch_size, generator)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_and_saves(tmp_path, sig):
    task = SignalAt(sig, at=3, length=16, n_tokens=3, vocab=8)
    cfg = TrainConfig(steps=50, batch_size=4, warmup_steps=1, progress=False, device="cpu", out_dir=str(tmp_path))
    tr = Trainer(TinyRNN(8), task, cfg)
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(sig).name} after step 3") as e:
        tr.train()
    assert e.value.step == 3 and e.value.path == ckpt.checkpoint_path(tmp_path, 3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert signal.getsignal(sig) == before  # handlers restored


def test_final_checkpoint_without_checkpoint_every(tmp_path):
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, progress=False, device="cpu", out_dir=str(tmp_path))
    Trainer(TinyRNN(8), task, cfg).train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
