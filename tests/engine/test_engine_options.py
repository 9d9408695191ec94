"""The engines' share of the training toolbox: --loss mse, --l1 and --precision."""

import copy

import pytest
import torch

from cnnlab.backprop.penalty import L1Penalty
from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.engine.autograd import AutogradEngine, LossScale
from cnnlab.engine.manual import ManualEngine
from cnnlab.models import create_model

PLAIN_SGD = OptimConfig(lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, grad_clip=0.0)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 16, 16, generator=generator), torch.randint(4, (16,), generator=generator)


@pytest.mark.parametrize("engine", [ManualEngine, AutogradEngine])
def test_the_l1_term_is_added_to_the_loss_and_its_gradient_to_the_step(engine):
    torch.manual_seed(0)
    model = create_model("lenet5_bn", (1, 16, 16), 4)
    x, y = batch()
    plain, penalized = copy.deepcopy(model), copy.deepcopy(model)
    term = L1Penalty(0.01, dict(model.named_parameters())).forward().item()
    loss_plain, _ = engine(plain, TrainConfig(optim=PLAIN_SGD)).train_step(x, y, 0.01)
    loss_l1, _ = engine(penalized, TrainConfig(l1=0.01, optim=PLAIN_SGD)).train_step(x, y, 0.01)
    assert loss_l1.item() == pytest.approx(loss_plain.item() + term, rel=1e-6)
    # SGD without momentum: the penalty moves each weight by lr * lambda * sign(w) more, biases not at all.
    for (name, a), b in zip(plain.named_parameters(), penalized.parameters()):
        expected = a.detach() - 0.01 * 0.01 * torch.sign(model.state_dict()[name]) if a.dim() > 1 else a.detach()
        assert torch.allclose(b.detach(), expected, atol=1e-6), name


def test_both_engines_train_the_same_with_mse_on_one_hot_targets():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 16, 16), 4, dropout=0.0)
    config = TrainConfig(loss="mse", label_smoothing=0.1, optim=PLAIN_SGD)
    manual, autograd = ManualEngine(model, config), AutogradEngine(copy.deepcopy(model), config)
    for seed in range(5):
        x, y = batch(seed)
        loss_m, _ = manual.train_step(x, y, 0.5)
        loss_a, _ = autograd.train_step(x, y, 0.5)
        assert loss_m.item() == pytest.approx(loss_a.item(), rel=1e-5)
    for a, b in zip(manual.model.state_dict().values(), autograd.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_bf16_runs_the_forward_pass_in_bf16_and_keeps_the_weights_in_fp32():
    torch.manual_seed(0)
    model = create_model("simple_cnn", (1, 16, 16), 4)
    fp32 = AutogradEngine(copy.deepcopy(model), TrainConfig(optim=PLAIN_SGD))
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    bf16 = AutogradEngine(model, TrainConfig(precision="bf16", optim=PLAIN_SGD))
    x, y = batch()
    loss_fp32, _ = fp32.train_step(x, y, 0.01)
    loss_bf16, logits = bf16.train_step(x, y, 0.01)
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss_bf16.item() != loss_fp32.item() and loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=2e-2)


def test_the_fp16_loss_scale_skips_overflowing_steps_halves_and_grows_back():
    scale = LossScale(scale=1024.0, interval=2)
    assert not scale.update(torch.tensor([1.0, float("inf")])) and scale.scale == 512.0
    assert scale.update(torch.ones(2)) and scale.scale == 512.0
    assert scale.update(torch.ones(2)) and scale.scale == 1024.0
    restored = LossScale()
    restored.load_state_dict(scale.state_dict())
    assert (restored.scale, restored.good_steps) == (1024.0, 0)
