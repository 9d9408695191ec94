import pytest
import torch
from torch import nn

from cnnlab.backprop.network import Sequential, layer_from_torch
from cnnlab.errors import CnnlabError

EVERY_LAYER = [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.MaxPool2d(2), nn.AvgPool2d(2),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.BatchNorm2d(1)]  # fmt: skip


@pytest.mark.parametrize("module", EVERY_LAYER, ids=lambda m: type(m).__name__)
def test_backward_before_forward_names_the_layer(module):
    layer = layer_from_torch(module, "5")
    with pytest.raises(CnnlabError, match=rf"{type(module).__name__} '5': backward\(\) needs a forward\(\) first"):
        layer.backward(torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("module", EVERY_LAYER, ids=lambda m: type(m).__name__)
def test_one_forward_allows_one_backward(module):
    layer = layer_from_torch(module, "5")
    y = layer.forward(torch.randn(2, 1, 6, 6))
    layer.backward(torch.ones_like(y))
    with pytest.raises(CnnlabError, match="needs a forward"):
        layer.backward(torch.ones_like(y))


def test_a_gradient_of_the_wrong_shape_names_the_layer_and_both_shapes():
    layer = layer_from_torch(nn.MaxPool2d(2), "2")
    layer.forward(torch.zeros(2, 6, 24, 24))
    expected = r"MaxPool2d '2': dout has shape \(2, 6, 24, 24\) but the forward output had shape \(2, 6, 12, 12\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.backward(torch.zeros(2, 6, 24, 24))


def test_a_wrong_input_deep_in_a_network_names_the_layer_that_rejects_it():
    network = Sequential.from_torch(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(100, 10)))
    with pytest.raises(CnnlabError, match=r"Linear '2' expects input of shape \(N, 100\), got \(1, 144\)"):
        network.forward(torch.zeros(1, 1, 8, 8))
