"""The reproduce experiment definitions: configs build, claims are judged as documented."""

import pytest

from ssmkit.training import reproduce as rp


def fake(exp, row, acc):
    return {"experiment": exp, "row": row, "label": rp.ROWS[row]["label"], "params": 1, "steps": 1,
            "planned_steps": 1, "task": {"name": exp, "length": 32}, "acc": acc}


def test_claims_follow_the_issue_thresholds():
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
    assert "| Mamba | 1 | 1 | 97.0% | 99.8% |" in text and "skipped" in text
    assert "NOT reproduced" in rp.format_claims(rp.check_claims(results, "default"))


@pytest.mark.parametrize("exp", rp.EXPERIMENTS)
@pytest.mark.parametrize("row", rp.ROWS)
@pytest.mark.parametrize("size", ["quick", "default", "full"])
def test_every_row_has_a_model_config(exp, row, size):
    cfg = rp.model_config(exp, row, size)
    assert cfg.n_layer == 2 and cfg.layer_pattern == rp.ROWS[row]["letter"] * 2 and cfg.mlp == "none"
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
