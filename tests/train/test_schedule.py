import math

import pytest

from cnnlab.config import OptimConfig
from cnnlab.train.schedule import learning_rate

TOTAL, PER_EPOCH = 100, 10


def rates(**options):
    optim = OptimConfig(lr=1.0, **options)
    return [learning_rate(optim, step, PER_EPOCH, TOTAL) for step in range(TOTAL)]


def test_constant():
    assert set(rates(schedule="constant")) == {1.0}


def test_step_decays_every_step_size_epochs():
    lr = rates(schedule="step", step_size=3, gamma=0.5)
    assert lr[0] == lr[29] == 1.0 and lr[30] == 0.5 and lr[60] == 0.25 and lr[99] == 0.125


def test_cosine_falls_from_the_peak_to_near_zero():
    lr = rates(schedule="cosine")
    assert lr[0] == 1.0 and lr[50] == pytest.approx(0.5) and lr[-1] < 1e-3
    assert all(a >= b for a, b in zip(lr, lr[1:]))


def test_onecycle_warms_up_then_anneals():
    lr = rates(schedule="onecycle", warmup_fraction=0.25)
    peak = lr.index(max(lr))
    assert peak == 25 and lr[peak] == 1.0 and lr[0] == pytest.approx(1 / 25)
    assert all(a < b for a, b in zip(lr[:peak], lr[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1 :]))
    assert lr[-1] < 1e-3 and math.isfinite(lr[-1])
