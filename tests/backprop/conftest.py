"""Shared checks for the hand-written layers: forward values and gradients against torch."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from cnnlab.backprop.gradcheck import check_layer
from cnnlab.backprop.network import layer_from_torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests push many tiny tensors, for which waking a second thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_matches_torch(module: nn.Module, x: torch.Tensor, seed: int = 0, points: int = 6):
    """The hand-written twin of `module` gives torch's output, autograd's gradients (rel <= 1e-10)
    and central finite differences (rel <= 1e-6, no kinks near x), all in float64."""
    module = module.double()
    layer = layer_from_torch(module)
    layer.train(module.training)
    generator = torch.Generator().manual_seed(seed)
    rng_state = torch.get_rng_state()
    with torch.no_grad():
        expected = module(x)
        torch.set_rng_state(rng_state)
        actual = layer.forward(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    layer.backward(torch.zeros_like(actual))  # release the forward above
    dout = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    row = check_layer(module, layer, x, dout, rng_state, points, generator)
    assert row.autograd_rel <= 1e-10, row
    assert row.fd_rel <= 1e-6 and row.fd_skipped == 0 and row.fd_points > 0, row
    return row


def random_input(shape, seed: int, away_from_zero: bool = False, distinct: bool = False) -> torch.Tensor:
    """float64 normal values; `away_from_zero`: |x| >= 0.05 (no ReLU kink within reach of the
    finite differences); `distinct`: a shuffled grid 0.01 apart (no ties in any max-pool window)."""
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        n = int(torch.tensor(shape).prod())
        return (torch.randperm(n, generator=generator).to(torch.float64) * 0.01 - n * 0.005).view(shape)
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    if away_from_zero:
        x = torch.where(x >= 0, x + 0.05, x - 0.05)
    return x


@pytest.fixture
def resnet():
    """cnnlab.models.resnet, for its residual blocks and the `resnet` builder."""
    return importlib.import_module("cnnlab.models.resnet")
