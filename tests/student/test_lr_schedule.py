"""Stage two's schedule (stages/student/schedule.py) is timm's PolyLRScheduler as training
used it, number for number, without importing timm."""

import subprocess
import sys

import pytest
import torch

from stages.student.schedule import PolyWarmup


def optimizer(lr):
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "weight_decay": 0.01},
                              {"params": [b], "weight_decay": 0.0}], lr=lr)


@pytest.mark.parametrize("steps, warmup, ratio, power, lr", [
    (200, 0.05, 0.1, 0.9, 6e-5), (37, 0.3, 0.1, 0.9, 2e-3), (1, 0.05, 0.1, 0.9, 1e-3),
    (10, 0.0, 0.1, 1.0, 1e-2), (7, 0.5, 0.0, 0.5, 3e-4)])
def test_every_step_equals_timms_poly_schedule(steps, warmup, ratio, power, lr):
    from timm.scheduler import PolyLRScheduler

    ours, theirs = optimizer(lr), optimizer(lr)
    mine = PolyWarmup(ours, steps, power, warmup_steps=int(warmup * steps),
                      warmup_lr_init=lr * ratio)
    ref = PolyLRScheduler(theirs, t_initial=steps, power=power,
                          warmup_t=int(warmup * steps), warmup_lr_init=lr * ratio,
                          t_in_epochs=False)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
    for t in range(steps + 2):  # and past the end
        mine.step_update(t)
        ref.step_update(t)
        assert [g["lr"] for g in ours.param_groups] == \
            [g["lr"] for g in theirs.param_groups], t  # exact, not approximately
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def test_training_does_not_import_timm():
    """A MiT student needs no timm: the train module's import (and the schedule) leaves it
    unloaded, so a run does not pay its start-up."""
    code = ("import sys, stages.student.train as t, torch; "
            "t.PolyWarmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4, 0.9)"
            "; print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
