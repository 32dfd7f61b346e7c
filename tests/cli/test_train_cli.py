"""CLI: --help for train/eval/reproduce, one-line user errors, a tiny train + eval, reproduce --quick."""

import json
import subprocess
import sys

import pytest

from ssmkit.cli.main import main


@pytest.mark.parametrize("cmd", ["train", "eval", "reproduce"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: ssmkit " + cmd in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--task", "no-such-task", "--steps", "1"], "unknown task"),
        (["train", "--steps", "1"], "exactly one of --task"),
        (["train", "--data", "/nonexistent/file.txt"], "does not exist"),
        (["train", "--task", "induction-heads", "--task-arg", "length=2"], "length must be >= 4"),
        (["train", "--task", "copying", "--pattern", "MQ"], "argument --pattern: expected letters"),
        (["train", "--task", "copying", "--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["eval", "/nonexistent/ckpt.pt"], "does not exist"),
        (["reproduce", "no-such-experiment"], "unknown experiment"),
        (["reproduce", "--rows", "lstm"], "unknown row"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_user_error_exit_status_via_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "ssmkit", "train", "--task", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_train_then_eval_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "induction-heads", "--task-arg", "length=12", "--task-arg", "vocab=6",
            "--pattern", "A", "--d-model", "16", "--steps", "4", "--batch-size", "4", "--warmup", "1",
            "--out", str(out), "--checkpoint-every", "2", "--device", "cpu", "--quiet", "--deterministic"]
    assert main(argv) == 0
    assert (out / "metrics.jsonl").exists() and (out / "checkpoint-00000004.pt").exists()
    assert main(["eval", str(out), "--lengths", "12", "24", "--sequences", "8", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint step 4" in text and "\n      24 " in text
    assert main([*argv[:argv.index("--steps")], "--steps", "6", *argv[argv.index("--steps") + 2:], "--resume"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == 6


def test_train_on_text_files(tmp_path, capsys):
    f = tmp_path / "corpus.txt"
    f.write_text("the selective scan " * 200)
    assert main(["train", "--data", str(f), "--seqlen", "16", "--pattern", "S", "--d-model", "16",
                 "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    assert "val: loss" in capsys.readouterr().out


def test_reproduce_quick_smoke(tmp_path, capsys):
    rc = main(["reproduce", "--quick", "--rows", "mamba", "attention", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| Mamba |" in text and "Attention (RoPE)" in text and "99.8%" in text
    assert "numbers mean nothing" in text and "NOT reproduced" not in text and "no verdict" in text
    assert "Claims (reported as measured, never tuned)" in text and "1 jobs" not in (tmp_path / "reproduce.md").read_text()
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert {(r["experiment"], r["row"]) for r in report["results"]} == {
        (e, r) for e in ("selective-copying", "induction-heads") for r in ("mamba", "attention")}
    assert (tmp_path / "reproduce.md").exists() and (tmp_path / "reproduce.png").exists()


def test_reproduce_table1_and_lra_quick(tmp_path, capsys):
    assert main(["reproduce", "--table1", "--quick", "--rows", "h3-hyena", "mamba-s4d", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| H3 + Hyena | H3 | Hyena |" in text and "| Mamba + S4D | Mamba | S4D |" in text and "30.1%" in text
    assert main(["reproduce", "--lra", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| S4D | 2 |" in text and "Attention (RoPE)" in text and "accuracy (fresh images)" in text
    for name in ("table1", "lra"):
        assert all((tmp_path / f"{name}.{ext}").exists() for ext in ("json", "md", "png"))
    assert not (tmp_path / "reproduce.json").exists()


def test_reproduce_experiment_names_after_rows_are_experiments():
    import argparse

    from ssmkit.cli.reproduce import _split
    from ssmkit.training.reproduce import EXPERIMENTS, ROWS

    ns = argparse.Namespace(experiments=[], rows=["mamba", "induction-heads"])
    assert _split(ns, EXPERIMENTS, ROWS, tuple(ROWS)) == (["induction-heads"], ["mamba"])
