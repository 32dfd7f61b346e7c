"""The paths a user walks: train -> generate / convert / eval on the run directory; runs that never
mix; a README DDP command that exits 0 on every rank; Ctrl-C / SIGTERM that keep the work."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import ssmkit
from ssmkit.cli.main import main
from tests.cli.conftest import TINY, fingerprint, run_ssmkit, ssmkit_env


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_writes_a_model_that_generate_convert_and_from_pretrained_load(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), *TINY, "--steps", "3", "--out", str(run)]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "checkpoint-00000003.pt",
            "metrics.jsonl"} <= names
    state = torch.load(run / "checkpoint-00000003.pt", weights_only=True)
    model = ssmkit.from_pretrained(run)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state["model"][k], rtol=0, atol=0)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the ", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = ssmkit.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits[..., :256], model(ids).logits[..., :256])
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_from_pretrained_picks_the_newest_checkpoint_of_a_run_without_model_files(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), *TINY, "--steps", "4", "--checkpoint-every", "2",
                 "--out", str(run)]) == 0
    (run / "config.json").unlink()
    (run / "model.safetensors").unlink()
    newest = torch.load(run / "checkpoint-00000004.pt", weights_only=True)["model"]
    model = ssmkit.from_pretrained(run)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], newest["lm_head.weight"], rtol=0, atol=0)


def test_eval_accepts_the_run_directory(tmp_path, capsys):
    run = tmp_path / "ih"
    argv = ["train", "--task", "induction-heads", "--task-arg", "length=12", "--task-arg", "vocab=6",
            "--pattern", "M", "--d-model", "16", "--steps", "2", "--batch-size", "4", "--out", str(run),
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert main(["eval", str(run), "--lengths", "12", "24", "--sequences", "4", "--device", "cpu"]) == 0
    assert "checkpoint step 2" in capsys.readouterr().out


def test_train_without_out_uses_a_printed_timestamped_directory(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(corpus), *TINY, "--steps", "1"]) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.safetensors").exists()
    assert f"runs/{runs[0].name}" in capsys.readouterr().out


def test_a_run_directory_is_never_mixed_with_another_run(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(corpus), *TINY, "--out", str(run)]
    assert main([*base, "--steps", "4", "--checkpoint-every", "2"]) == 0
    before = fingerprint(run)
    # A fresh run into it: refused, nothing touched (the old code pruned the new run's checkpoints).
    assert main([*base, "--steps", "2"]) == 2
    assert "already holds a training run" in _err_line(capsys) and fingerprint(run) == before
    # --force replaces it: only the new run's files remain.
    assert main([*base, "--steps", "1", "--force"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-00000001.pt"]
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1
    # --resume with another model: one line naming the setting, nothing touched.
    before = fingerprint(run)
    capsys.readouterr()
    assert main([*base, "--steps", "3", "--resume", "--pattern", "MA"]) == 2
    assert "layer_pattern='MM'" in _err_line(capsys) and fingerprint(run) == before
    assert main([*base, "--steps", "2", "--resume"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_resume_without_a_checkpoint_says_so(tmp_path, corpus, capsys, setup):
    run = tmp_path / "run"
    if setup == "empty":
        run.mkdir()
    assert main(["train", "--data", str(corpus), *TINY, "--steps", "1", "--out", str(run), "--resume"]) == 2
    assert "nothing to resume" in _err_line(capsys)
    assert not list(run.iterdir()) if run.exists() else True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, corpus, *extra):
    # The README's command (torchrun --nproc_per_node=2 -m ssmkit train --data ... --out ...), small.
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ssmkit", "train", "--data", str(corpus), "--out", str(tmp_path / "ddp"), *TINY, *extra]
    return subprocess.run([sys.executable, *cmd], env=ssmkit_env(), capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_readme_torchrun_command_exits_zero_on_every_rank(tmp_path, corpus):
    # --checkpoint-every 2 with 3 steps: a periodic checkpoint (step 2) and the final one (step 3),
    # the final save being the one that crashed rank 0 at teardown before.
    r = _torchrun(tmp_path, corpus, "--steps", "3", "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr
    assert (tmp_path / "ddp" / "checkpoint-00000003.pt").exists()
    assert ssmkit.from_pretrained(tmp_path / "ddp").config.layer_pattern == "MM"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("extra", [["--checkpoint-every", "0"], ["--strategy", "fsdp"]])
def test_torchrun_exits_zero_in_other_settings(tmp_path, corpus, extra):
    r = _torchrun(tmp_path, corpus, "--steps", "2", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ddp" / "checkpoint-00000002.pt").exists()
    ssmkit.from_pretrained(tmp_path / "ddp")  # the gathered (unsharded) weights


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_writes_a_checkpoint(tmp_path, corpus, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssmkit", "train", "--data", str(corpus), *TINY, "--steps", "100000",
           "--out", str(run)]
    p = subprocess.Popen(cmd, env=ssmkit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (run / "metrics.jsonl").exists():  # the first step is logged inside the training loop
            assert p.poll() is None and time.time() < deadline, p.communicate()[1]
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {signal.Signals(sig).name} after step" in lines[0], err
    assert "--resume" in lines[0]
    ckpts = sorted(run.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1 and (run / "model.safetensors").exists()
    step = int(ckpts[0].stem.split("-")[1])
    assert step > 0 and f"after step {step};" in lines[0]


def test_python_dash_m_exit_status_and_one_line(tmp_path):
    r = run_ssmkit("generate", "tiny-mamba", "--prompt", "x", "--temperature", "-1", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("ssmkit generate: error: argument --temperature: expected a number >= 0, "
                                "got '-1' (see ssmkit generate --help)")
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_train_log_tensorboard_writes_events_into_the_run(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), *TINY, "--steps", "2", "--out", str(run), "--log", "tensorboard"]) == 0
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, corpus):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ssmkit", "train", "--data", str(corpus), "--out", str(run), *TINY, "--steps", "100000"]
    p = subprocess.Popen(cmd, env=ssmkit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (run / "metrics.jsonl").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    said = [ln for ln in err.splitlines() if ln.startswith("ssmkit train: stopped by SIGTERM")]
    assert len(said) == 1, err[-3000:]  # rank 0 only
    ckpts = sorted(run.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1 and ckpts[0].name in said[0]
    ssmkit.from_pretrained(run)
