import math

import pytest
import torch
from torch import nn

from ssmkit.training.optim import build_optimizer, param_groups
from ssmkit.training.schedule import build_scheduler, lr_factor


class FakeMamba(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(4, 8, bias=False)
        self.dt_proj = nn.Linear(2, 8)
        self.A_log = nn.Parameter(torch.zeros(8, 4))
        self.D = nn.Parameter(torch.ones(8))
        self.dt_bias = nn.Parameter(torch.zeros(8))
        self.norm = nn.LayerNorm(8)
        self.marked = nn.Parameter(torch.zeros(3, 3))
        self.marked._no_weight_decay = True
        self.ssm_B = nn.Parameter(torch.zeros(3, 3))
        self.ssm_B._optim = {"lr": 1e-4, "weight_decay": 0.0}


def test_no_decay_groups_and_optim_overrides():
    groups = param_groups(FakeMamba(), lr=1e-3, weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["in_proj.weight"]["weight_decay"] == 0.1
    assert by_name["dt_proj.weight"]["weight_decay"] == 0.1
    for n in ("dt_proj.bias", "A_log", "D", "dt_bias", "norm.weight", "norm.bias", "marked"):
        assert by_name[n]["weight_decay"] == 0.0, n
        assert by_name[n]["lr"] == 1e-3
    assert by_name["ssm_B"]["lr"] == 1e-4
    assert len(groups) == 3


def test_optimizer_keeps_relative_lr_under_schedule():
    model = FakeMamba()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[0] / lrs[-1] == pytest.approx(0.1)


def test_schedule_shape():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)
    vals = [lr_factor(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(FakeMamba(), lr=0)
    opt = build_optimizer(FakeMamba())
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(opt, 1, 10, min_lr_ratio=2.0)
