"""Backpropagation through time: the hand-written RNN and LSTM against torch's, in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.losses import SoftmaxCrossEntropy
from cnnlab.backprop.network import Sequential, layer_from_torch
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.models.recurrent import RowReader
from tests.backprop.conftest import assert_matches_torch, random_input

CELLS = [nn.RNN, nn.LSTM]


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(CELLS), st.integers(1, 4), st.integers(1, 3), st.integers(1, 9), st.integers(1, 5),
       st.integers(1, 6), st.integers(0, 2**16))  # fmt: skip
def test_cells_match_autograd_and_finite_differences(cell, n, c, rows, w, hidden, seed):
    """Any batch, channel count, sequence length (one row up) and hidden size."""
    torch.manual_seed(seed)
    reader = RowReader(cell(c * w, hidden, batch_first=True))
    assert_matches_torch(reader, random_input((n, c, rows, w), seed))


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_bptt_through_a_whole_model_matches_autograd_to_1e_10(name):
    """Every parameter's gradient of the loss, over 28 time steps, as the engine computes it."""
    torch.manual_seed(0)
    model = create_model(name, (1, 28, 28), 10).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64, generator=generator)
    y = torch.randint(10, (8,), generator=generator)

    network, loss = Sequential.from_torch(model), SoftmaxCrossEntropy()
    with torch.no_grad():
        loss.forward(network.forward(x), y)
        network.backward(loss.backward())
    manual = network.gradients()

    nn.functional.cross_entropy(model(x), y).backward()
    assert list(manual) == [key for key, _ in model.named_parameters()]
    for key, param in model.named_parameters():
        scale = max(float(param.grad.abs().max()), 1e-2)
        assert float((manual[key] - param.grad).abs().max()) / scale <= 1e-10, key


def test_the_rnns_gradient_vanishes_back_through_time_and_the_lstms_less():
    """dL/dx for the first rows against the last: the plain RNN's falls off by orders of magnitude."""
    falloff = {}
    for name in ("rnn", "lstm"):
        torch.manual_seed(0)
        network = Sequential.from_torch(create_model(name, (1, 28, 28), 10).double())
        x = torch.randn(64, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            network.forward(x)
            dx = network.backward(torch.ones(64, 10, dtype=torch.float64))  # (N, 1, 28, 28)
        per_row = dx.abs().mean(dim=(0, 1, 3))  # (28,): how much each row moves the output
        falloff[name] = float(per_row[:4].mean() / per_row[-4:].mean())
    assert falloff["rnn"] < 1e-3 and falloff["lstm"] > 10 * falloff["rnn"], falloff


def test_without_input_grad_the_weights_still_get_theirs():
    torch.manual_seed(1)
    reader = RowReader(nn.LSTM(6, 4, batch_first=True)).double()
    layer = layer_from_torch(reader, "0")
    layer.input_grad = False
    x = random_input((3, 2, 5, 3), seed=1)
    dout = random_input((3, 4), seed=2)
    layer.forward(x)
    assert layer.backward(dout) is None
    (reader(x) * dout).sum().backward()
    for key, param in reader.named_parameters():
        torch.testing.assert_close(layer.grads[key], param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "rnn, message",
    [
        (nn.LSTM(4, 3, num_layers=2, batch_first=True), "more than one layer"),
        (nn.RNN(4, 3, batch_first=True, bidirectional=True), "two directions"),
        (nn.LSTM(4, 3), "time-major input"),
        (nn.RNN(4, 3, batch_first=True, nonlinearity="relu"), "a relu nonlinearity"),
        (nn.GRU(4, 3, batch_first=True), "no hand-written GRU"),
    ],
)
def test_recurrent_modules_it_cannot_rebuild_are_named(rnn, message):
    with pytest.raises(CnnlabError, match=f"{message}.*module '0'.*--engine autograd"):
        layer_from_torch(RowReader(rnn), "0")


def test_an_image_of_the_wrong_width_names_the_layer_and_the_shapes():
    layer = layer_from_torch(RowReader(nn.LSTM(28, 8, batch_first=True)), "0")
    expected = r"LSTM '0' expects input of shape \(N, C, H, W\) with C\*W = 28, got \(2, 1, 8, 8\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.forward(torch.zeros(2, 1, 8, 8))
