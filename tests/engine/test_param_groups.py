"""Parameter groups and frozen layers: both engines take the same steps, and a frozen layer never moves."""

import copy

import pytest
import torch

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.engine.autograd import AutogradEngine
from cnnlab.engine.manual import ManualEngine
from cnnlab.models import create_model


@pytest.fixture(scope="module")
def batches():
    """Four batches of 32 normalized digits: x (32, 1, 28, 28) float32, y (32,) int64."""
    splits = load_splits("digits", None, 0.1, 0)
    x, y = normalization_for(splits).apply(splits.train.images[:128]), splits.train.labels[:128]
    return list(zip(x.split(32), y.split(32)))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_both_engines_take_the_same_grouped_steps_and_leave_a_frozen_layer_alone(batches, name):
    torch.manual_seed(8)
    model = create_model("lenet5", (1, 28, 28), 10)
    initial = copy.deepcopy(model.state_dict())
    model[3].requires_grad_(False)  # the second convolution, as --freeze 3 leaves it
    twin = copy.deepcopy(model)
    optim = OptimConfig(name=name, lr=1e-3, momentum=0.5, nesterov=False, weight_decay=0.01, head_lr_mult=4.0,
                        bias_decay=False)  # fmt: skip
    config = TrainConfig(optim=optim)
    manual, autograd = ManualEngine(model, config), AutogradEngine(twin, config)
    assert [g["lr_scale"] for g in autograd.optimizer.param_groups] == [1.0, 1.0, 4.0, 4.0]
    for x, y in batches:
        manual.train_step(x, y, optim.lr)
        autograd.train_step(x, y, optim.lr)
    for key, value in autograd.model.state_dict().items():
        torch.testing.assert_close(manual.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        if key.startswith("3."):
            assert torch.equal(value, initial[key]) and torch.equal(manual.model.state_dict()[key], initial[key])
        else:
            assert not torch.equal(value, initial[key]), key


def test_the_head_learns_at_its_multiple_of_the_rate(batches):
    """With plain SGD one step moves each weight by lr * gradient: the head's by head_lr_mult times as much."""
    torch.manual_seed(9)
    model = create_model("lenet5", (1, 28, 28), 10).double()  # float64: the steps' ratio is not lost in rounding
    x, y = batches[0]
    steps = {}
    for mult in (1.0, 5.0):
        optim = OptimConfig(momentum=0.0, nesterov=False, weight_decay=0.0, grad_clip=0.0, head_lr_mult=mult)
        engine = AutogradEngine(copy.deepcopy(model), TrainConfig(optim=optim), fast=False)
        engine.train_step(x.double(), y, 0.01)
        steps[mult] = {k: v - model.state_dict()[k] for k, v in engine.model.state_dict().items()}
    torch.testing.assert_close(steps[5.0]["11.weight"], 5 * steps[1.0]["11.weight"], rtol=1e-9, atol=1e-15)
    assert torch.equal(steps[5.0]["9.weight"], steps[1.0]["9.weight"])


def test_an_optimizer_state_saved_before_there_were_groups_still_resumes(batches):
    """A checkpoint written before parameter groups holds one torch group without "lr_scale"."""
    torch.manual_seed(10)
    config = TrainConfig()
    engine = AutogradEngine(create_model("lenet5", (1, 28, 28), 10), config)
    engine.train_step(*batches[0], 0.05)
    state = copy.deepcopy(engine.optimizer_state())  # a copy, as a checkpoint holds: not the live buffers
    del state["param_groups"][0]["lr_scale"]
    resumed = AutogradEngine(copy.deepcopy(engine.model), config)
    resumed.load_optimizer_state(state)
    engine.train_step(*batches[1], 0.05)
    resumed.train_step(*batches[1], 0.05)
    for key, value in engine.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
