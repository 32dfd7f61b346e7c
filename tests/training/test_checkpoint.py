"""Atomic checkpoints: a run killed mid-write keeps the previous checkpoint; resume is bit-exact."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ssmkit.tasks import SelectiveCopying
from ssmkit.training import TrainConfig, Trainer
from ssmkit.training import checkpoint as ckpt
from tests.training.tiny_models import TinyRNN


def trainer(out_dir, steps=40, **kw):
    torch.manual_seed(0)
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, progress=False, out_dir=str(out_dir),
                      deterministic=True, threads=1, seed=7, **kw)
    return Trainer(TinyRNN(task.vocab_size, dropout=0.2), task, cfg)


def test_resume_equals_uninterrupted(tmp_path):
    full = trainer(tmp_path / "full").train()["losses"]
    a = trainer(tmp_path / "run", checkpoint_every=20)
    first = a.train(steps=20)["losses"]
    assert ckpt.list_checkpoints(tmp_path / "run")[-1][0] == 20
    # Disturb every RNG the loop touches, as a fresh process would.
    torch.manual_seed(999)
    b = trainer(tmp_path / "run", checkpoint_every=20)
    assert b.resume() and b.step == 20
    rest = b.train()["losses"]
    assert len(rest) == 20
    assert first + rest == full  # bit for bit


def test_keeps_previous_and_ignores_tmp(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / ".checkpoint-00000004.pt.abc.tmp").write_bytes(b"partial")
    assert ckpt.load_latest(tmp_path)["step"] == 3
    # A corrupt newest file falls back to the previous one.
    ckpt.checkpoint_path(tmp_path, 3).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert ckpt.load_latest(tmp_path)["step"] == 2
    with pytest.raises(ValueError, match="cannot be read"):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 3))


def test_killed_during_checkpoint_write_keeps_previous(tmp_path):
    """A subprocess dies (os._exit, no cleanup) between writing the temp file and the rename."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[2])!r})
        from ssmkit.training import checkpoint as ckpt
        from tests.training.test_checkpoint import trainer
        tr = trainer({str(tmp_path)!r}, checkpoint_every=10)
        tr.train(steps=10)
        ckpt._before_rename = lambda tmp: os._exit(17)
        tr.train(steps=10)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 17, r.stderr
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the half-done write
    ref = trainer(tmp_path / "ref")
    expected = ref.train(steps=15)["losses"][10:]
    b = trainer(tmp_path, checkpoint_every=10)  # (re-seeds the global RNG; resume restores it)
    assert b.resume() and b.step == 10
    assert b.train(steps=5)["losses"] == expected
