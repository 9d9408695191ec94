"""Fused layers compute what the layers they replace compute: values, input and parameter gradients."""

import pytest
import torch
from torch import nn

from cnnlab.backprop.fused import ConvPool, TiledMaxPool
from cnnlab.backprop.network import Sequential
from cnnlab.models import create_model


def outputs_and_gradients(network: Sequential, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The network's logits for x and its parameter gradients for a fixed weighting of them."""
    network.skip_input_grad()
    logits = network.forward(x)
    network.backward(torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits))
    return logits, network.gradients()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel", [(2, 2), (3, 2)])
def test_tiled_max_pool_equals_torchs_pool_and_relu_with_ties(kernel, relu):
    generator = torch.Generator().manual_seed(0)
    # small integers around zero: ties in most windows, and windows whose maximum the ReLU cuts
    x = torch.randint(-2, 3, (2, 3, 7, 8), generator=generator).to(torch.float64).requires_grad_()
    expected = nn.MaxPool2d(kernel)(x)
    expected = torch.relu(expected) if relu else expected
    dout = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    (expected_dx,) = torch.autograd.grad(expected, x, dout)
    layer = TiledMaxPool(kernel, relu)
    assert torch.equal(layer.forward(x.detach()), expected.detach())
    assert torch.equal(layer.backward(dout), expected_dx)


@pytest.mark.parametrize("input_grad", [False, True])
def test_conv_pool_equals_conv_relu_pool_and_gives_dx_only_when_asked(input_grad):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 5, padding=1).double()
    x = torch.randn(3, 1, 13, 13, dtype=torch.float64, requires_grad=True)
    expected = nn.MaxPool2d(2)(torch.relu(conv(x)))
    dout = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [x, conv.weight, conv.bias], dout)

    layer = ConvPool(conv.weight.detach(), conv.bias.detach(), (1, 1), (2, 2), relu=True, path="0")
    layer.input_grad = input_grad
    torch.testing.assert_close(layer.forward(x.detach()), expected.detach(), rtol=1e-12, atol=1e-12)
    dx = layer.backward(dout)
    grads = layer.gradients()
    torch.testing.assert_close(grads["0.weight"], expected_grads[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["0.bias"], expected_grads[2], rtol=1e-12, atol=1e-12)
    if input_grad:
        torch.testing.assert_close(dx, expected_grads[0], rtol=1e-12, atol=1e-12)
    else:
        assert dx is None


def test_a_fast_network_fuses_lenet5s_layers_and_matches_the_plain_one():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10).double()
    plain, fast = Sequential.from_torch(model), Sequential.from_torch(model, fast=True)
    assert [type(layer).__name__ for layer in fast.layers[:3]] == ["ConvPool", "Conv2d", "TiledMaxPool"]
    assert len(fast.layers) < len(plain.layers)
    assert list(fast.parameters()) == list(plain.parameters()) == list(dict(model.named_parameters()))
    for name, tensor in fast.parameters().items():  # views of the model's own parameters
        assert tensor.data_ptr() == model.get_parameter(name).data_ptr()


def test_fast_and_plain_networks_agree_on_the_same_batch():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    plain_logits, plain_grads = outputs_and_gradients(Sequential.from_torch(model), x)
    fast_logits, fast_grads = outputs_and_gradients(Sequential.from_torch(model, fast=True), x)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-12, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_models_without_a_fast_kernel_build_the_plain_network():
    model = create_model("resnet8", (3, 32, 32), 10)
    assert [type(layer) for layer in Sequential.from_torch(model, fast=True).layers] == [
        type(layer) for layer in Sequential.from_torch(model).layers
    ]
