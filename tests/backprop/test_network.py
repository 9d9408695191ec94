import copy

import pytest
import torch
from torch import nn

from cnnlab.backprop.network import Sequential
from cnnlab.backprop.optim import SGD
from cnnlab.errors import CnnlabError
from cnnlab.models import all_models, create_model

MODELS = sorted(spec.name for spec in all_models())
SMALL_INPUT = {"cifar_cnn": (3, 16, 16)}


def small_model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    return create_model(name, SMALL_INPUT.get(name, (1, 16, 16)), 10)


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_is_rebuilt_with_its_own_tensors_under_its_own_names(name):
    model = small_model(name)
    network = Sequential.from_torch(model)
    expected, ours = model.state_dict(), network.state_dict()
    assert list(ours) == list(expected)
    for key, value in expected.items():
        assert ours[key].shape == value.shape and ours[key].data_ptr() == value.data_ptr(), key
    assert list(network.parameters()) == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_every_registered_model_computes_what_the_module_computes(name, training):
    model = small_model(name).double().train(training)
    twin = copy.deepcopy(model)
    network = Sequential.from_torch(twin).train(training)
    x = torch.randn(3, *SMALL_INPUT.get(name, (1, 16, 16)), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(network.forward(x), expected, rtol=1e-10, atol=1e-12)
    for key, value in model.state_dict().items():  # running statistics moved alike
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_an_update_through_the_network_is_an_update_of_the_module():
    model = small_model("lenet5")
    before = copy.deepcopy(model.state_dict())
    network = Sequential.from_torch(model)
    x, y = torch.randn(4, 1, 16, 16), torch.randn(4, 10)
    network.backward(network.forward(x) - y)
    SGD(network.parameters()).step(network.gradients(), lr=0.1)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
        assert p.requires_grad, name  # still an ordinary nn.Parameter for the autograd side


def test_an_unknown_module_is_named_with_its_place_in_the_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.GELU()))
    expected = r"no hand-written layer for GELU \(module '1.1' of the model\): use --engine autograd"
    with pytest.raises(CnnlabError, match=expected):
        Sequential.from_torch(model)


def test_only_sequential_models_are_taken():
    with pytest.raises(CnnlabError, match="from nn.Sequential, got Linear"):
        Sequential.from_torch(nn.Linear(2, 2))


def test_the_first_layer_is_told_that_no_input_gradient_is_needed():
    network = Sequential.from_torch(small_model("lenet5"))
    network.skip_input_grad()
    assert network.layers[0].input_grad is False and network.layers[3].input_grad is True
    x = torch.randn(2, 1, 16, 16)
    assert network.backward(torch.ones_like(network.forward(x))) is None


@pytest.mark.parametrize("training", [True, False])
def test_a_resnet_is_rebuilt_with_its_residual_blocks(resnet, training):
    torch.manual_seed(0)
    model = resnet.resnet((1, 16, 16), 10, blocks_per_stage=1).double().train(training)
    twin = copy.deepcopy(model)
    network = Sequential.from_torch(twin).train(training)
    assert list(network.state_dict()) == list(twin.state_dict())
    assert all(network.state_dict()[k].data_ptr() == v.data_ptr() for k, v in twin.state_dict().items())
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(network.forward(x), expected, rtol=1e-10, atol=1e-12)
