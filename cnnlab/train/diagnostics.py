"""Training diagnostics: each layer's gradients, updates and activations, epoch by epoch.

The first step of every epoch is measured, on its own batch:

- gradient norm of each layer: the 2-norm of the gradient the engine computed for
  that step, before clipping. With `--engine manual` it is the hand-written
  backward pass's, with `--engine autograd` torch.autograd's, read from the same
  place (`SlicedStep.observe`), so the two sit side by side;
- update-to-weight ratio: ||w_after - w_before|| / ||w_before|| over the step, the
  size of the step the optimizer took relative to the weights (around 1e-3 is
  healthy; far below, the layer barely learns; far above, it thrashes);
- for every activation (ReLU, Tanh, Sigmoid, a residual block's ReLU output): the
  mean and std of its values over the batch, and for ReLUs the fraction of dead
  units, those that are zero for every image of the batch.

Activations come from one more forward pass of the batch through the plain module,
in eval mode and without gradients: it changes no weight, running statistic or
random stream, so a run trains exactly as it would unmeasured. One batch an
epoch keeps the cost to that forward pass and a copy of the weights.

Recorded in the run directory as diagnostics.json:
{"epochs": [{"epoch": 1, "engine": "autograd", "batch": 128,
             "layers": {"0": {"grad_norm", "update_ratio", "weight_norm"}, ...},
             "activations": {"1": {"mean", "std", "dead_fraction"}, ...}}, ...]}
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from cnnlab.engine.step import Engine
from cnnlab.errors import CnnlabError
from cnnlab.models.resnet import Residual
from cnnlab.train.rundir import RunDirectory

FILE_NAME = "diagnostics.json"
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, Residual)
_RECTIFIED = (nn.ReLU, Residual)  # whose units can die: relu outputs


class Diagnostics:
    """Measures one step an epoch of `engine` (named `engine_name`) and records it in the run directory."""

    def __init__(self, engine: Engine, engine_name: str) -> None:
        self.engine, self.engine_name = engine, engine_name
        self.measured: dict | None = None  # the last measured step's figures, until `save` writes them

    def measured_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """engine.train_step(x, y, lr, batch), measured; x: (N, C, H, W) float32, normalized; y: (N,) int64.

        In a data-parallel job x is this process's shard, and the activations are its own.
        """
        model, engine = self.engine.model, self.engine
        activations = activation_statistics(model, x)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        squares: dict[str, float] = defaultdict(float)  # layer -> sum of its gradient's squares

        def observe(gradient: torch.Tensor) -> None:  # (P,), before clipping
            for name, part in zip(engine.names, gradient.split(engine.sizes)):
                squares[layer_of(name)] += part.double().square().sum().item()

        engine.step.observe = observe
        try:
            loss, logits = engine.train_step(x, y, lr, batch)
        finally:
            engine.step.observe = None
        self.measured = {
            "engine": self.engine_name,
            "batch": len(x),
            "layers": _layer_figures(dict(model.named_parameters()), before, squares),
            "activations": activations,
        }
        return loss, logits

    def save(self, run: RunDirectory, epoch: int) -> None:
        """Write diagnostics.json: the earlier epochs already there, then `epoch`'s measured step.

        Epochs from `epoch` on are dropped, so a resumed run that repeats an epoch records it once.
        """
        if self.measured is None:
            return
        try:
            earlier = [e for e in read_diagnostics(run.path) if e["epoch"] < epoch]
        except CnnlabError as exc:  # the figures are an aid: a damaged file must not stop training
            warnings.warn(f"{exc}; starting it again from epoch {epoch}")
            earlier = []
        run.write_json(FILE_NAME, {"epochs": [*earlier, {"epoch": epoch, **self.measured}]})
        self.measured = None


def layer_of(parameter: str) -> str:
    """The layer a parameter belongs to: "3.weight" -> "3", "4.body.0.weight" -> "4.body.0"."""
    return parameter.rpartition(".")[0]


def _layer_figures(
    params: dict[str, torch.Tensor], before: dict[str, torch.Tensor], squares: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Per layer: gradient norm, weight norm before the step and update-to-weight ratio over it."""
    weight, update = defaultdict(float), defaultdict(float)
    for name, p in params.items():
        old = before[name].double()
        weight[layer_of(name)] += old.square().sum().item()
        update[layer_of(name)] += (p.detach().double() - old).square().sum().item()
    return {
        layer: {
            "grad_norm": math.sqrt(squares[layer]),
            "weight_norm": math.sqrt(weight[layer]),
            "update_ratio": math.sqrt(update[layer]) / math.sqrt(weight[layer]) if weight[layer] > 0 else math.nan,
        }
        for layer in weight
    }


@torch.no_grad()
def activation_statistics(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per activation layer of `model` on the batch x (N, C, H, W): mean, std and, for ReLUs, dead fraction.

    Runs in eval mode (the model's mode is put back): no running statistic or random stream moves.
    """
    found: dict[str, dict[str, float]] = {}

    def measure(name: str, module: nn.Module, out: torch.Tensor) -> None:
        figures = {"mean": out.mean().item(), "std": out.std().item()}
        if isinstance(module, _RECTIFIED):
            figures["dead_fraction"] = (out == 0).all(dim=0).double().mean().item()  # units zero on every image
        found[name] = figures

    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: measure(name, m, out))
        for name, module in model.named_modules()
        if isinstance(module, _ACTIVATIONS)
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def read_diagnostics(run_dir: Path) -> list[dict]:
    """The epochs recorded in `run_dir`'s diagnostics.json, oldest first; [] when there is none."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return []
    try:
        epochs = json.loads(path.read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CnnlabError(f"{path} is not readable diagnostics ({exc})") from None
    if not (isinstance(epochs, list) and all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in epochs)):
        raise CnnlabError(f"{path} is not readable diagnostics: it lacks its list of epochs")
    return epochs
