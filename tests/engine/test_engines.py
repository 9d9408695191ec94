import copy
import io

import pytest
import torch
from torch import nn

from cnnlab.engine.manual import ManualEngine
from cnnlab.cli import main
from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.models import all_models, create_model
from cnnlab.models.resnet import resnet
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.engine.autograd import AutogradEngine


@pytest.fixture(scope="module")
def digits():
    """Normalized digits training images (N, 1, 28, 28) float32 and labels (N,)."""
    splits = load_splits("digits", None, 0.1, 0)
    return normalization_for(splits).apply(splits.train.images), splits.train.labels


def twin_engines(model: nn.Module, config: TrainConfig):
    """A manual and an autograd engine on two copies of the same initial weights."""
    twin = copy.deepcopy(model)
    return ManualEngine(model, config), AutogradEngine(twin, config)


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def train_both(manual, autograd, digits, steps: int, batch_size: int, lr: float, seed: int = 0) -> None:
    x_all, y_all = digits
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(y_all), (batch_size,), generator=generator)
        loss_m, logits_m = manual.train_step(x_all[index], y_all[index], lr)
        loss_a, logits_a = autograd.train_step(x_all[index], y_all[index], lr)
        assert loss_m.item() == pytest.approx(loss_a.item(), abs=1e-4)


def test_lenet5_trained_by_both_engines_has_the_same_weights_after_100_float32_steps(digits):
    """100 SGD steps from the same weights on the same batches end within 1e-4 of each other.

    The two engines round a few results differently (torch's softmax backward uses its own
    exp), ~1e-9 at first. Training can amplify that without bound: where a max-pool window
    or a ReLU sits on a near-tie, 1e-9 decides which way the gradient goes. With plain SGD at
    lr 0.01 the runs stay within 1e-5 for every seed tried; momentum at higher rates makes
    even two autograd runs 1e-7 apart end up 1e-1 apart, so that is no test of the engine.
    """
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10)
    initial = copy.deepcopy(model)
    config = TrainConfig(optim=OptimConfig(lr=0.01, momentum=0.0, nesterov=False, weight_decay=5e-4))
    manual, autograd = twin_engines(model, config)
    train_both(manual, autograd, digits, steps=100, batch_size=32, lr=0.01)
    assert max_difference(manual.model, autograd.model) <= 1e-4
    assert max_difference(manual.model, initial) > 1e-2  # and the weights did move


@pytest.mark.parametrize("fast", [True, False], ids=["fast kernels", "plain layers"])
def test_the_hand_written_engine_takes_the_same_steps_with_or_without_the_fast_kernels(digits, fast):
    """fast=True runs LeNet-5's first convolution and pools as compiled loops (backprop/fused.py);
    fast=False runs one hand-written layer per module. Both take the autograd engine's steps."""
    torch.manual_seed(2)
    model = create_model("lenet5", (1, 28, 28), 10)
    config = TrainConfig(optim=OptimConfig(lr=0.01, momentum=0.0, nesterov=False))
    manual = ManualEngine(model, config, fast=fast)
    autograd = AutogradEngine(copy.deepcopy(model), config, fast=False)
    fused = {type(layer).__name__ for layer in manual.networks[0].layers} & {"ConvPool", "TiledMaxPool"}
    assert fused == ({"ConvPool", "TiledMaxPool"} if fast else set())
    train_both(manual, autograd, digits, steps=10, batch_size=64, lr=0.01)
    assert max_difference(manual.model, autograd.model) <= 1e-5


@pytest.mark.parametrize(
    "optim",
    [
        OptimConfig(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, grad_clip=0.5),
        OptimConfig(name="adam", lr=1e-3, weight_decay=1e-4),
        OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2, grad_clip=1.0),
    ],
    ids=["sgd-nesterov-clip", "adam", "adamw-clip"],
)
def test_every_optimizer_with_smoothing_and_clipping_takes_the_autograd_steps(digits, optim):
    torch.manual_seed(1)
    model = create_model("lenet5", (1, 28, 28), 10)
    manual, autograd = twin_engines(model, TrainConfig(label_smoothing=0.1, optim=optim))
    train_both(manual, autograd, digits, steps=5, batch_size=64, lr=optim.lr)
    assert max_difference(manual.model, autograd.model) <= 1e-5


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_every_registered_model_takes_the_autograd_engines_steps(name):
    """In float64, where rounding cannot hide a mistake: in float32 a batch-norm bias
    gradient, a sum with heavy cancellation, can differ by a few percent between any two
    summation orders, and ResNet-20 has twenty-one batch norms."""
    torch.manual_seed(4)
    in_shape = (3, 16, 16) if name == "cifar_cnn" else (1, 20, 20)
    model = create_model(name, in_shape, 10).double().train()
    manual, autograd = twin_engines(model, TrainConfig(label_smoothing=0.1))
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(16, *in_shape, dtype=torch.float64, generator=generator)
        y = torch.randint(10, (16,), generator=generator)
        manual.train_step(x, y, 0.05)
        autograd.train_step(x, y, 0.05)
    for key, value in autograd.model.state_dict().items():
        torch.testing.assert_close(manual.model.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_a_resnet_takes_the_autograd_engines_steps():
    torch.manual_seed(5)
    model = resnet((1, 16, 16), 10, blocks_per_stage=1).double().train()
    manual, autograd = twin_engines(model, TrainConfig(optim=OptimConfig(name="adamw", lr=1e-3)))
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(8, 1, 16, 16, dtype=torch.float64, generator=generator)
        y = torch.randint(10, (8,), generator=generator)
        manual.train_step(x, y, 1e-3)
        autograd.train_step(x, y, 1e-3)
    for key, value in autograd.model.state_dict().items():
        torch.testing.assert_close(manual.model.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def dropout_batch_norm_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4 * 13 * 13, 16), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Linear(16, 10))  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_the_engine_follows_the_modules_train_and_eval_mode(digits, training):
    torch.manual_seed(2)
    model = dropout_batch_norm_model().train(training)
    manual, autograd = twin_engines(model, TrainConfig(optim=OptimConfig(lr=0.01)))
    x_all, y_all = digits
    for step in range(3):
        x, y = x_all[step * 32 : (step + 1) * 32], y_all[step * 32 : (step + 1) * 32]
        state = torch.get_rng_state()
        manual.train_step(x, y, 0.01)
        torch.set_rng_state(state)  # the same dropout masks for both
        autograd.train_step(x, y, 0.01)
    for key, value in autograd.model.state_dict().items():
        # torch's own batch norm, on the autograd path, drifts ~1e-5 relative from the exact
        # batch mean (checked in float64); cnnlab's stays within 1e-9 of it.
        torch.testing.assert_close(manual.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert int(manual.model[1].num_batches_tracked) == (3 if training else 0)


def test_saved_optimizer_state_resumes_exactly(digits):
    x_all, y_all = digits
    batches = [(x_all[i * 32 : (i + 1) * 32], y_all[i * 32 : (i + 1) * 32]) for i in range(6)]
    config = TrainConfig(optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2))
    torch.manual_seed(3)
    straight = ManualEngine(create_model("lenet5", (1, 28, 28), 10), config)
    split = ManualEngine(copy.deepcopy(straight.model), config)
    for x, y in batches:
        straight.train_step(x, y, 1e-3)
    for x, y in batches[:3]:
        split.train_step(x, y, 1e-3)
    buffer = io.BytesIO()
    torch.save({"model": split.model.state_dict(), "optimizer": split.optimizer_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = create_model("lenet5", (1, 28, 28), 10)
    resumed_model.load_state_dict(saved["model"])
    resumed = ManualEngine(resumed_model, config)
    resumed.load_optimizer_state(saved["optimizer"])
    for x, y in batches[3:]:
        resumed.train_step(x, y, 1e-3)
    assert max_difference(straight.model, resumed.model) == 0


def test_a_step_returns_plain_tensors_and_leaves_autograd_untouched(digits):
    x_all, y_all = digits
    model = create_model("lenet5", (1, 28, 28), 10)
    loss, logits = ManualEngine(model, TrainConfig()).train_step(x_all[:8], y_all[:8], 0.05)
    assert loss.shape == () and logits.shape == (8, 10)
    assert not loss.requires_grad and not logits.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_train_with_the_manual_engine_from_the_command_line_resumes_exactly(tmp_path):
    """2 epochs straight == 1 epoch, then --resume for the second: bit-identical weights."""
    recipe = ["--engine", "manual", "--batch-size", "64", "--seed", "3", "--schedule", "step", "--step-size", "1",
              "--gamma", "0.5", "--label-smoothing", "0.1", "--runs-dir", str(tmp_path)]  # fmt: skip
    assert main(["train", "--name", "straight", "--epochs", "2", *recipe]) == 0
    assert main(["train", "--name", "split", "--epochs", "1", *recipe]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert straight.config["engine"] == "manual" and split.epoch == 2
    for key, value in straight.model_state.items():
        assert torch.equal(value, split.model_state[key]), key
    assert straight.optimizer_state["optimizer"] == "sgd"
    assert straight.metrics["val_accuracy"] > 0.5  # it learned: digits are easy
