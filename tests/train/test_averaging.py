import pytest
import torch
from torch import nn

from cnnlab.train.averaging import WeightAverage


def test_the_average_follows_the_warmed_up_recursion():
    """a <- a + (1 - d_t)(w - a), d_t = min(decay, (1 + t) / (10 + t)), from the source's weights."""
    source = nn.Linear(3, 2)
    average = WeightAverage(source, decay=0.5)
    expected = [p.detach().clone() for p in source.parameters()]
    for t in range(12):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        d = min(0.5, (1 + t) / (10 + t))
        expected = [a + (1 - d) * (w.detach() - a) for a, w in zip(expected, source.parameters())]
        for got, want in zip(average.model.parameters(), expected):
            torch.testing.assert_close(got, want)
    assert average.updates == 12


def test_resumed_updates_continue_the_decay_where_they_left_off():
    source = nn.Linear(2, 1)
    average = WeightAverage(source, decay=0.999, updates=1000)
    before = [p.clone() for p in average.model.parameters()]
    with torch.no_grad():
        source.weight.add_(1.0)
    average.update()
    # d_1000 = min(0.999, 1001 / 1010) = 0.991...: the step is (1 - d) of the change, not 90% of it
    moved = (average.model.weight - before[0]).abs().max().item()
    assert moved == pytest.approx(1 - 1001 / 1010, rel=1e-4)


def test_training_never_sees_the_average_and_buffers_are_copied():
    source = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(source, decay=0.9)
    source.train()(torch.randn(8, 2) * 5 + 3)  # moves the running statistics
    weights = [p.clone() for p in source.parameters()]
    average.update()
    assert all(torch.equal(a, b) for a, b in zip(weights, source.parameters()))
    assert not any(p.requires_grad for p in average.model.parameters()) and not average.model.training
    torch.testing.assert_close(average.model[1].running_mean, source[1].running_mean, rtol=0, atol=0)
    assert average.model[0].weight is not source[0].weight
