"""`ssmkit bench generation`: the throughput-vs-batch sweep, its out-of-memory stop, its files."""

import json

import torch

from ssmkit.bench import generation as g
from ssmkit.cli.main import main


def test_sweep_doubles_the_batch_and_stops_at_out_of_memory(monkeypatch):
    def fake(model, batch, prompt, new, reps):
        if batch >= 8:
            raise torch.OutOfMemoryError("no room")
        return {"batch": batch, "seconds": 1.0, "tokens_per_s": batch * new}

    monkeypatch.setattr(g, "_one", fake)
    model = torch.nn.Linear(1, 1)
    model.device = torch.device("cpu")
    rows = g.sweep(model, prompt=4, new=2, max_batch=64, reps=1)
    assert [r["batch"] for r in rows] == [1, 2, 4, 8] and rows[-1] == {"batch": 8, "oom": True}
    s = g.summary({"mamba": rows, "attention": rows[:2]})
    assert s["best"]["mamba"]["batch"] == 4 and s["best_ratio"] == 2.0 and s["ratio_per_batch"] == {1: 1.0, 2: 1.0}


def test_bench_generation_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = main(["bench", "generation", "--device", "cpu", "--size", "tiny", "--prompt", "8", "--new", "3",
               "--max-batch", "2", "--reps", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| batch | Mamba tok/s | attention tok/s |" in text and "the paper: ~5x" in text
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]["mamba"]] == [1, 2]
    assert data["info"]["prompt"] == 8 and data["summary"]["best_ratio"] > 0
    assert (tmp_path / "gen.png").exists()


def test_bench_generation_takes_a_gated_deltanet_model(tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = main(["bench", "generation", "--device", "cpu", "--size", "tiny", "--ssm", "gated-deltanet", "--prompt", "8",
               "--new", "3", "--reps", "1", "--out", str(out)])
    assert rc == 0
    assert "| batch | Gated DeltaNet tok/s | attention tok/s |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]["gated-deltanet"]] == [1] and data["info"]["ssm"] == "gated-deltanet"
    assert g.build("130m", "gated-deltanet", torch.device("meta"), torch.float32).config.layer_pattern == "G" * 24
    assert main(["bench", "generation", "--device", "cpu", "--size", "1.4b", "--ssm", "gated-deltanet"]) == 2
    assert "no such model at --size 1.4b" in capsys.readouterr().err
