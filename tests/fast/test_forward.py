"""The fast path computes what the model computes: the same logits and gradients, bit for bit (up to
rounding for inference on a few images, and where LeNet-5's first convolution runs compiled loops);
model untouched."""

import functools

import pytest
import torch
import torch.nn.functional as F

from cnnlab.models import all_models, create_model
from cnnlab.fast.forward import fast_forward
from cnnlab.fast.plan import SMALL_BATCH


def images_with_ties(n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Random images with a constant band, where max-pool windows hold equal values (ties)."""
    x = torch.randn(n, *shape)
    x[:, :, : shape[1] // 3] = 0.5
    return x


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_fast_forward_matches_the_model_in_values_and_gradients(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, in_shape, num_classes=10)
    n = SMALL_BATCH + 4  # above the small-batch inference path, which rounds differently
    x, y = images_with_ties(n, in_shape), torch.arange(n) % 10

    F.cross_entropy(model(x), y).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = fast_forward(model)(x)
    F.cross_entropy(logits, y).backward()

    if name == "lenet5" and in_shape[0] == 1:
        # Its first convolution (1 -> 6 channels) runs cnnlab's compiled loops, which sum in
        # another order than oneDNN: equal up to float rounding.
        same = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)
    else:
        # The convolutions and linear layers are the model's own calls on the same inputs, and a
        # max or a ReLU makes no rounding, so nothing may differ by even one bit.
        same = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
    same(logits, model(x))
    for key, param in model.named_parameters():
        same(param.grad, expected[key], msg=key)
    with torch.inference_mode():  # the path evaluation and prediction take: no autograd.Function
        same(fast_forward(model)(x), model(x))


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_inference_on_a_few_images_takes_the_im2col_convolution_and_matches_to_rounding(name):
    from torch.profiler import profile

    torch.manual_seed(0)
    model = create_model(name, (1, 28, 28), num_classes=10).eval()
    forward = fast_forward(model)
    for n in (1, SMALL_BATCH):
        x = images_with_ties(n, (1, 28, 28))
        with torch.inference_mode():
            torch.testing.assert_close(forward(x), model(x), rtol=1e-5, atol=1e-5)
    if forward is model:  # no tiling pool, not a Sequential (the ResNets): nothing to check the kernels of
        return
    kernels = {}
    for n in (1, SMALL_BATCH + 1):
        with torch.inference_mode(), profile() as prof:
            forward(torch.randn(n, 1, 28, 28))
        kernels[n] = {event.name for event in prof.events()}
    assert "aten::thnn_conv2d" in kernels[1] and "aten::mkldnn_convolution" not in kernels[1]
    assert "aten::mkldnn_convolution" in kernels[SMALL_BATCH + 1] and "aten::thnn_conv2d" not in kernels[SMALL_BATCH + 1]


def test_lenet5_trains_its_first_convolution_and_pool_in_one_compiled_step_and_the_second_through_onednn():
    from torch.profiler import profile

    model = create_model("lenet5", (1, 28, 28), 10)
    with profile() as prof:
        F.cross_entropy(fast_forward(model)(torch.randn(32, 1, 28, 28)), torch.arange(32) % 10).backward()
    names = [event.name for event in prof.events()]
    assert names.count("ConvPool2d") == 1 and names.count("aten::mkldnn_convolution") == 1
    assert names.count("TiledMaxPool2d") == 1  # the second pool; the first runs inside ConvPool2d
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())


def test_fast_forward_leaves_parameters_and_state_dict_as_they_were():
    model = create_model("lenet5", (1, 28, 28), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = fast_forward(model)
    F.cross_entropy(forward(torch.randn(4, 1, 28, 28)), torch.arange(4)).backward()
    state = model.state_dict()
    assert list(state) == list(before)
    for key, value in state.items():
        assert value.is_contiguous() and torch.equal(value, before[key]), key
        assert model.get_parameter(key).grad.is_contiguous(), key


def test_fast_forward_follows_the_models_mode_and_weights_as_they_change():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Dropout(0.5), torch.nn.Flatten()
    )
    forward, x = fast_forward(model), torch.randn(2, 1, 10, 10)
    model.eval()
    torch.testing.assert_close(forward(x), model(x))
    with torch.no_grad():
        model[0].weight.mul_(2)
    torch.testing.assert_close(forward(x), model(x))
    model.train()
    assert (forward(x) == 0).float().mean() > 0.3  # dropout is active again


def test_models_without_convolutions_other_layers_or_devices_get_the_model_back():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert fast_forward(mlp) is mlp
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    assert fast_forward(conv, "meta") is conv
    normalized = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert fast_forward(normalized) is normalized
    overlapping = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, stride=2))
    assert fast_forward(overlapping) is overlapping
    too_many_positions = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.MaxPool2d(16))  # 256 > one byte
    assert fast_forward(too_many_positions) is too_many_positions
    lenet = create_model("lenet5", (1, 28, 28), 10)
    assert fast_forward(lenet) is not lenet


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [torch.nn.ReLU(), torch.nn.MaxPool2d(2)],
        lambda: [torch.nn.MaxPool2d(2), torch.nn.ReLU()],
        lambda: [torch.nn.MaxPool2d((3, 2))],
        lambda: [torch.nn.Tanh(), torch.nn.MaxPool2d(2, stride=2), torch.nn.Tanh()],
    ],
    ids=["relu-pool", "pool-relu", "pool-3x2", "tanh-pool-tanh"],
)
def test_every_arrangement_of_tiling_pools_and_relus_matches_the_layers(layers):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), *layers())
    x = images_with_ties(4, (2, 11, 11)).double()  # 9x9 maps: the last row and column lie outside every 2x2 tile
    model.double()
    forward = fast_forward(model)
    assert forward is not model
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = model(x1), forward(x2)
    assert torch.equal(got, expected)
    (got * torch.arange(got.numel()).view_as(got)).sum().backward()
    (expected * torch.arange(got.numel()).view_as(got)).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_half_precision_inputs_run_through_the_models_own_layers():
    model = create_model("lenet5", (1, 28, 28), 10).to(torch.bfloat16)
    x = torch.randn(2, 1, 28, 28, dtype=torch.bfloat16)
    assert torch.equal(fast_forward(model)(x), model(x))
