"""One test over every registered model, as timm does: shapes, finite outputs, gradients everywhere."""

import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.models import all_models, count_parameters, create_model

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 20, 24)]


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_model_maps_images_to_logits_and_trains(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, in_shape, num_classes=7)
    x = torch.randn(5, *in_shape)  # (N, C, H, W)
    logits = model(x)
    assert logits.shape == (5, 7) and torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, f"{param_name} gets no gradient"


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_every_model_can_overfit_one_small_batch(name):
    torch.manual_seed(0)
    # 16x16 is the smallest input every model takes: it keeps the deep models quick here.
    model = create_model(name, (1, 16, 16), num_classes=4)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert (model(x).argmax(1) == y).all(), f"final loss {loss.item()}"


def test_lenet5_is_the_classic_architecture():
    model = create_model("lenet5", (1, 28, 28), 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(256, 120), (120, 84), (84, 10)]
    assert count_parameters(model) == 44_426


def test_lenet5_adapts_to_colour_and_size():
    model = create_model("lenet5", (3, 32, 32), 100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert model[0].in_channels == 3 and [m for m in model if isinstance(m, torch.nn.Linear)][0].in_features == 400


def test_unknown_model_and_impossible_inputs_are_clear_errors():
    with pytest.raises(CnnlabError, match="unknown model 'resnet9000'.*lenet5"):
        create_model("resnet9000", (1, 28, 28), 10)
    with pytest.raises(CnnlabError, match="cannot take 8x8 images"):
        create_model("lenet5", (1, 8, 8), 10)
    with pytest.raises(CnnlabError, match="at least 2 classes"):
        create_model("lenet5", (1, 28, 28), 1)
