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


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_dropout_goes_before_every_fc_layer_and_none_keeps_the_plain_state_dict(name):
    plain, dropped = create_model(name, (1, 28, 28), 10), create_model(name, (1, 28, 28), 10, dropout=0.4)
    modules = list(dropped)
    linears = [i for i, m in enumerate(modules) if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(modules[i - 1], torch.nn.Dropout) and modules[i - 1].p == 0.4 for i in linears)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert count_parameters(plain) == count_parameters(dropped)


@pytest.mark.parametrize("name", ["lenet5", "cifar_cnn_bn", "resnet8"])
def test_dropout_is_active_in_training_and_inactive_in_evaluation(name):
    torch.manual_seed(0)
    model = create_model(name, (1, 28, 28), 10, dropout=0.5)
    x = torch.randn(4, 1, 28, 28)
    # The same weights without the Dropout layers: what evaluation must compute.
    without = torch.nn.Sequential(*(m for m in model if not isinstance(m, torch.nn.Dropout))).eval()
    model.eval()
    assert torch.equal(model(x), model(x)) and torch.equal(model(x), without(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("plain, with_bn", [("lenet5", "lenet5_bn"), ("simple_cnn", "simple_cnn_bn"), ("cifar_cnn", "cifar_cnn_bn")])
def test_batch_norm_variants_norm_every_hidden_layer_of_the_plain_model(plain, with_bn):
    a, b = create_model(plain, (1, 28, 28), 10), create_model(with_bn, (1, 28, 28), 10)
    weighted = [m for m in a.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    norms = [m for m in b.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert len(norms) == len(weighted) - 1  # every layer but the output
    layers = list(b)
    for i, m in enumerate(layers):
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            assert layers[i - 1].bias is None and isinstance(layers[i + 1], torch.nn.ReLU)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_a_dropout_outside_0_1_is_refused(dropout):
    with pytest.raises(CnnlabError, match=r"--dropout must be in \[0, 1\)"):
        create_model("lenet5", (1, 28, 28), 10, dropout=dropout)
