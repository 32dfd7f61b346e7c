"""The reproduce experiment definitions: configs build, claims are judged by the stated thresholds."""

import pytest

from ssmkit.training import reproduce as rp


def fake(exp, row, acc):
    return {"experiment": exp, "row": row, "label": rp.ROWS[row]["label"], "params": 1, "steps": 1,
            "planned_steps": 1, "task": {"name": exp, "length": 32}, "acc": acc}


def test_claims_follow_the_stated_thresholds():
    results = [
        fake("selective-copying", "mamba", {"1": 0.97}),
        fake("selective-copying", "s4d", {"1": 0.70}),
        fake("induction-heads", "mamba", {"1": 1.0, "4": 1.0, "16": 1.0, "64": 0.60, "256": 0.3}),
        fake("induction-heads", "attention", {"1": 1.0, "4": 0.2, "16": 0.1, "64": 0.1, "256": None}),
    ]
    claims = {c["claim"]: c["ok"] for c in rp.check_claims(results, "default")}
    assert claims == {
        "selective copying: Mamba >= 95%": True,
        "selective copying: S4D (no gate) far below Mamba (>= 30 points)": False,
        "induction heads: Mamba >= 95% at 64x the training length": False,
        "induction heads: attention < 50% at 64x the training length": True,
    }
    text = rp.format_tables(results, "default")
    assert "| Mamba | Mamba | S6 | 1 | 1 | 97.0% | 99.8% |" in text and "skipped" in text
    assert "NOT reproduced" in rp.format_claims(rp.check_claims(results, "default"))


@pytest.mark.parametrize("exp", rp.EXPERIMENTS)
@pytest.mark.parametrize("row", rp.ROWS)
@pytest.mark.parametrize("size", ["quick", "default", "full"])
def test_every_row_has_a_model_config(exp, row, size):
    cfg = rp.model_config(exp, row, size)
    n = rp.SIZES[exp][size].get("n_layer", 2)
    assert cfg.n_layer == n and cfg.layer_pattern == rp.ROWS[row]["letter"] * n and cfg.mlp == "none"
    spec = rp.ROWS[row]
    if spec["block"] == "H3":
        assert cfg.h3_cfg["inner"] == spec["inner"].lower()
    if spec["block"] == "Mamba" and spec["inner"] != "S6":
        assert cfg.ssm_cfg["inner"] == spec["inner"].lower()
    if spec["inner"] == "Hyena":  # the implicit filter covers the longest evaluation
        sub = cfg.h3_cfg if spec["block"] == "H3" else cfg.ssm_cfg
        assert sub["inner_cfg"]["l_max"] >= rp.SIZES[exp][size]["task"].get("length", 0)
    if row == "s6":
        assert cfg.ssm_cfg["use_gate"] is False
    if row == "s4d":
        assert cfg.s4d_cfg["postact"] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="experiment"):
        rp.reproduce(["nope"])
    with pytest.raises(ValueError, match="row"):
        rp.reproduce(rows=["lstm"])
    with pytest.raises(ValueError, match="size setting"):
        rp._sizes("induction-heads", "default", {"colour": 1})


def test_table1_and_pathfinder_claims_and_tables():
    cells = {"s4d": 0.6, "s6": 0.99, "h3-s4d": 0.7, "h3-hyena": 0.85, "h3-s6": 0.99, "mamba-s4d": 0.5,
             "mamba-hyena": 0.6, "mamba": 0.98}
    results = [fake("selective-copying", r, {"1": v}) for r, v in cells.items()]
    results += [fake("pathfinder", "s4d-glu", {"1": 0.71}), fake("pathfinder", "attention", {"1": 0.52})]
    for r in results:
        r["model_config"] = {"n_layer": 4}
        r["task"] = {"name": r["experiment"], "length": 32, "size": 32}
    claims = {c["claim"]: c["ok"] for c in rp.check_claims(results, "default")}
    assert claims["selective copying, no gate block: S6 beats the LTI inner layer(s) by >= 20 points"] is True
    assert claims["selective copying, H3 block: S6 beats the LTI inner layer(s) by >= 20 points"] is False
    assert claims["selective copying, Mamba block: S6 beats the LTI inner layer(s) by >= 20 points"] is True
    assert claims["Pathfinder: S4D above chance (>= 60%)"] is True
    assert claims["Pathfinder: attention below S4D"] is True
    text = rp.format_tables(results, "default")
    assert "| H3 + Hyena | H3 | Hyena | 1 | 1 | 85.0% | 30.1% |" in text
    assert "| S4D | 4 | 1 | 1 | 71.0% | S4: 86.1% / 88.1% |" in text
    assert tuple(rp.TABLE1_ROWS) == ("s4d", "s6", "h3-s4d", "h3-hyena", "h3-s6", "mamba-s4d", "mamba-hyena", "mamba")


def test_a_stopped_row_resumes_from_its_checkpoint_and_finished_rows_are_read_back(tmp_path, monkeypatch):
    import json
    import os
    import signal

    from ssmkit.training.trainer import Trainer, TrainingInterrupted

    whole = rp.run_row("selective-copying", "mamba", "quick", progress=False, out_dir=tmp_path / "whole")
    step = Trainer.train_step

    def stop_after_3(self):
        rec = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: checkpoint, then stop
        return rec

    monkeypatch.setattr(Trainer, "train_step", stop_after_3)
    with pytest.raises(TrainingInterrupted):
        rp.run_row("selective-copying", "mamba", "quick", progress=False, out_dir=tmp_path / "split")
    monkeypatch.setattr(Trainer, "train_step", step)
    assert not (tmp_path / "split" / "result.json").exists()
    split = rp.run_row("selective-copying", "mamba", "quick", progress=False, out_dir=tmp_path / "split",
                       resume=True)
    assert split["steps"] == whole["steps"] == 6
    assert split["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-6)
    assert split["acc"] == whole["acc"]
    assert json.loads((tmp_path / "split" / "result.json").read_text())["acc"] == split["acc"]

    # reproduce(resume=True) reads a finished row back instead of training it again
    (tmp_path / "rows").mkdir()
    os.replace(tmp_path / "split", tmp_path / "rows" / "selective-copying__mamba")
    monkeypatch.setattr(rp, "run_row", lambda *a, **k: pytest.fail("a finished row was trained again"))
    rep = rp.reproduce(["selective-copying"], ["mamba"], size="quick", jobs=1, progress=False,
                       rows_dir=tmp_path / "rows", resume=True)
    assert rep["results"][0]["acc"] == split["acc"]
