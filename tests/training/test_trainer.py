import json

import pytest
import torch

from ssmkit.tasks import Copying, InductionHeads
from ssmkit.training import ByteCorpus, TrainConfig, Trainer
from tests.training.tiny_models import TinyRNN


def make(tmp_path=None, **kw):
    torch.manual_seed(0)
    task = Copying(n_tokens=3, lag=2, vocab=6)
    cfg = TrainConfig(**{"steps": 30, "batch_size": 16, "lr": 1e-2, "warmup_steps": 3, "progress": False,
                         "log_every": 5, "out_dir": str(tmp_path) if tmp_path else None, **kw})
    return Trainer(TinyRNN(task.vocab_size, dropout=0.0), task, cfg)


def test_learns_and_logs_json_lines(tmp_path):
    tr = make(tmp_path, steps=60, eval_every=20)
    out = tr.train()
    assert out["steps"] == 60 and len(out["losses"]) == 60
    assert sum(out["losses"][-5:]) / 5 < sum(out["losses"][:5]) / 5
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "eval" not in r]
    assert [r["step"] for r in steps] == list(range(5, 61, 5))
    assert all({"loss", "acc", "lr", "tokens_per_s"} <= set(r) for r in steps)
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert 0.0 <= evals[-1]["eval"]["eval"]["acc"] <= 1.0


def test_gradient_accumulation_matches_one_big_batch():
    a = make(accum_steps=1).train(steps=3)["losses"]
    b = make(accum_steps=4).train(steps=3)["losses"]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_evaluation_is_fixed_and_length_generalisation_tasks():
    torch.manual_seed(0)
    task = InductionHeads(length=8, vocab=6)
    cfg = TrainConfig(steps=2, batch_size=4, progress=False, eval_batches=2)
    tr = Trainer(TinyRNN(6), task, cfg, eval_tasks={"1x": task, "8x": task.with_seqlen(64)})
    res = tr.evaluate_all()
    assert set(res) == {"1x", "8x"}
    assert tr.evaluate(task) == tr.evaluate(task)


def test_byte_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("state space models " * 30)
    corpus = ByteCorpus([str(tmp_path)], length=32, val_fraction=0.1)
    b = corpus.sample(3, torch.Generator().manual_seed(0))
    assert b.inputs.shape == (3, 32) and b.loss_mask.all()
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    val = corpus.split("val")
    assert val.n_bytes < corpus.n_bytes
    torch.manual_seed(0)
    tr = Trainer(TinyRNN(256), corpus, TrainConfig(steps=3, batch_size=4, progress=False),
                 eval_tasks={"val": val})
    assert "bits_per_byte" in corpus.metric(torch.zeros(3, 32, 256), b)
    assert tr.train()["eval"]["val"]["loss"] > 0
    with pytest.raises(FileNotFoundError):
        ByteCorpus([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="seqlen"):
        ByteCorpus([str(tmp_path / "a.txt")], length=10_000)


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="multiple"):
        make(batch_size=6, accum_steps=4)
    with pytest.raises(TypeError, match="Module"):
        Trainer(object(), Copying(), TrainConfig())
