"""Training diagnostics: both engines' own gradients side by side, update sizes, activations, and runs left unchanged."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.engine import make_engine
from cnnlab.models import create_model
from cnnlab.train.diagnostics import Diagnostics, activation_statistics, read_diagnostics
from cnnlab.train.rundir import RunDirectory

LENET_LAYERS = ["0", "3", "7", "9", "11"]  # the layers with weights
LENET_RELUS = ["1", "4", "8", "10"]


def lenet_and_batch(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("lenet5", (1, 28, 28), 10), torch.randn(64, 1, 28, 28), torch.arange(64) % 10


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, lr: float = 0.05) -> dict:
    diagnostics = Diagnostics(make_engine(model, config), config.engine)
    diagnostics.measured_step(x, y, lr)
    return diagnostics.measured


def test_both_engines_record_the_same_figures_for_the_same_step():
    model, x, y = lenet_and_batch()
    figures = {}
    for engine in ("autograd", "manual"):
        config = TrainConfig(engine=engine, device="cpu")
        figures[engine] = measure(copy.deepcopy(model), x, y, config)
    autograd, manual = figures["autograd"], figures["manual"]
    assert (autograd["engine"], manual["engine"]) == ("autograd", "manual")
    assert list(autograd["layers"]) == list(manual["layers"]) == LENET_LAYERS
    for layer in LENET_LAYERS:
        for key in ("grad_norm", "update_ratio", "weight_norm"):
            assert manual["layers"][layer][key] == pytest.approx(autograd["layers"][layer][key], rel=1e-4), (layer, key)
    assert list(autograd["activations"]) == LENET_RELUS
    assert autograd["activations"] == manual["activations"]  # measured on the same module with the same weights


def test_gradient_norms_are_taken_before_clipping_and_updates_are_the_clipped_step():
    model, x, y = lenet_and_batch(seed=1)
    config = TrainConfig(engine="autograd", device="cpu")
    config.optim.momentum, config.optim.nesterov, config.optim.weight_decay, config.optim.grad_clip = 0.0, False, 0.0, 0.01
    reference = copy.deepcopy(model)
    loss = F.cross_entropy(reference(x), y)
    grads = dict(zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, list(reference.parameters()))))
    total = math.sqrt(sum(g.square().sum().item() for g in grads.values()))
    assert total > 0.01  # so the step is clipped
    factor = 0.01 / (total + 1e-6)
    lr = 0.5
    figures = measure(model, x, y, config, lr=lr)["layers"]
    for layer in LENET_LAYERS:
        norm = math.sqrt(sum(grads[f"{layer}.{kind}"].square().sum().item() for kind in ("weight", "bias")))
        weight = math.sqrt(sum(p.square().sum().item() for n, p in reference.named_parameters() if n.startswith(f"{layer}.")))
        assert figures[layer]["grad_norm"] == pytest.approx(norm, rel=1e-4)
        # Plain SGD: the update is lr times the clipped gradient.
        assert figures[layer]["update_ratio"] == pytest.approx(lr * factor * norm / weight, rel=1e-3)


def test_activations_give_mean_std_and_the_units_dead_on_every_image():
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[3, 0] = 1.0  # unit 3 follows the first input: alive on some images, zero on others
        layer.bias.copy_(torch.tensor([-1.0, -1.0, 1.0, 0.0]))  # units 0 and 1 always negative: dead
    norm = nn.BatchNorm1d(4)
    model = nn.Sequential(layer, norm, nn.ReLU(), nn.Tanh()).train()
    x = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [2.0, 0, 0]])
    running = norm.running_mean.clone()
    figures = activation_statistics(model, x)
    assert model.training and norm.training
    torch.testing.assert_close(norm.running_mean, running)  # eval mode: no running statistic moved
    relu_out = torch.relu(norm.eval()(layer(x)))  # in eval mode, as measured
    assert figures["2"] == pytest.approx({"mean": relu_out.mean().item(), "std": relu_out.std().item(), "dead_fraction": 0.5})
    assert set(figures["3"]) == {"mean", "std"}  # tanh units do not die


def test_a_measured_epoch_trains_exactly_as_an_unmeasured_one(monkeypatch):
    from cnnlab.data.sources import load_splits
    from cnnlab.train.loop import EpochSoFar, prepare, train_one_epoch
    from cnnlab.train.progress import Progress

    config = TrainConfig(epochs=1, batch_size=200, device="cpu")
    config.augment.translate = 0.1  # a random stream the measurement must not disturb
    splits = load_splits("digits", None, config.val_fraction, config.seed)
    results = []
    for measured in (True, False):
        if not measured:
            monkeypatch.setattr(Diagnostics, "measured_step", lambda self, x, y, lr, batch=None: self.engine.train_step(x, y, lr, batch))
        torch.manual_seed(config.seed)
        setup = prepare(config, splits=splits, device=torch.device("cpu"), progress=Progress(quiet=True), resume=None)
        so_far = EpochSoFar(setup.shuffle.get_state())
        order = torch.randperm(len(setup.data), generator=setup.shuffle)
        train_one_epoch(setup, order, so_far, step=0)
        results.append((so_far.loss_sum, setup.engine.model.state_dict(), torch.get_rng_state(), setup.diagnostics.measured))
    (loss, weights, rng, figures), (plain_loss, plain_weights, plain_rng, _) = results
    assert loss == plain_loss and torch.equal(rng, plain_rng)
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    assert figures["batch"] == 200 and list(figures["layers"]) == LENET_LAYERS


def test_a_run_records_every_epoch(trained_run):
    epochs = read_diagnostics(trained_run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for epoch in epochs:
        assert epoch["engine"] == "autograd" and list(epoch["layers"]) == LENET_LAYERS
        assert all(v["grad_norm"] > 0 and 0 < v["update_ratio"] < 1 for v in epoch["layers"].values())
        assert all(0 <= v["dead_fraction"] <= 1 for v in epoch["activations"].values())


def test_an_epoch_saved_again_replaces_itself_and_the_later_ones(tmp_path):
    run = RunDirectory(tmp_path)
    diagnostics = Diagnostics(engine=None, engine_name="manual")  # type: ignore[arg-type]
    for epoch in (1, 2, 3):
        diagnostics.measured = {"engine": "manual", "marker": epoch}
        diagnostics.save(run, epoch)
    diagnostics.measured = {"engine": "manual", "marker": "again"}
    diagnostics.save(run, 2)  # a resumed run repeating epoch 2
    assert [(e["epoch"], e["marker"]) for e in read_diagnostics(tmp_path)] == [(1, 1), (2, "again")]


def test_a_damaged_file_is_started_again_with_a_warning(tmp_path):
    (tmp_path / "diagnostics.json").write_text("{not json")
    diagnostics = Diagnostics(engine=None, engine_name="autograd")  # type: ignore[arg-type]
    diagnostics.measured = {"engine": "autograd"}
    with pytest.warns(UserWarning, match="not readable diagnostics"):
        diagnostics.save(RunDirectory(tmp_path), 4)
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == {"epochs": [{"epoch": 4, "engine": "autograd"}]}
