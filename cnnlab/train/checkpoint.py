"""Checkpoints: self-describing dicts of plain values and tensors.

A checkpoint holds everything needed to rebuild the model without the run that
made it (model name and config, weights, normalization, class names) and to
continue that run exactly (optimizer state, epoch, step, RNG states, config).
With `--ema` the weights are the moving average (what was validated and is
used from then on) and `training_state` holds the raw weights training
continues from.
It loads with `torch.load(weights_only=True)`, so a hostile file cannot run
code, and it is written atomically.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.atomicfile import atomic_open
from cnnlab.data.dataset import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model

FORMAT_VERSION = 1
_FORMAT_KEY = "cnnlab_checkpoint"


@dataclass
class Checkpoint:
    """model: {"name", "in_shape", "num_classes"}; the other fields as saved by `save_checkpoint`.

    model_state: the weights to use; training_state: the weights to resume training from,
    None where they are model_state.
    """

    model: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    normalization: Normalization
    classes: tuple[str, ...]
    dataset: str
    epoch: int = 0
    step: int = 0
    optimizer_state: dict | None = None
    rng: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    training_state: dict[str, torch.Tensor] | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.model["in_shape"])  # type: ignore[return-value]

    def build_model(self) -> nn.Module:
        """The model with the checkpoint's weights, on the CPU, in eval mode."""
        model = create_model(self.model["name"], self.in_shape, self.model["num_classes"])
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in self.model_state.items()}
        if expected != found:
            raise CnnlabError(
                f"the checkpoint's weights do not fit model '{self.model['name']}' "
                f"for input {self.in_shape}: it was saved from a different model"
            )
        model.load_state_dict(self.model_state)
        return model.eval()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    payload = {
        _FORMAT_KEY: FORMAT_VERSION,
        "model": {**checkpoint.model, "in_shape": list(checkpoint.in_shape)},
        "model_state": _on_cpu(checkpoint.model_state),
        "normalization": checkpoint.normalization.to_dict(),
        "classes": list(checkpoint.classes),
        "dataset": checkpoint.dataset,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "optimizer_state": checkpoint.optimizer_state,
        "rng": checkpoint.rng,
        "config": checkpoint.config,
        "metrics": checkpoint.metrics,
        "training_state": _on_cpu(checkpoint.training_state),
    }
    with atomic_open(path) as f:
        torch.save(payload, f)


def _on_cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"checkpoint {path} does not exist: pass a .pt file or a run directory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CnnlabError(f"{path} is not a readable cnnlab checkpoint ({reason[:200]}): it is corrupt or of another kind") from None
    if not isinstance(payload, dict) or _FORMAT_KEY not in payload:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no format marker): pass a file written by `cnnlab train`")
    if payload[_FORMAT_KEY] > FORMAT_VERSION:
        raise CnnlabError(f"{path} uses checkpoint format {payload[_FORMAT_KEY]}; upgrade cnnlab to read it")
    try:
        return Checkpoint(
            model=payload["model"],
            model_state=payload["model_state"],
            normalization=Normalization.from_dict(payload["normalization"]),
            classes=tuple(payload["classes"]),
            dataset=payload["dataset"],
            epoch=payload["epoch"],
            step=payload["step"],
            optimizer_state=payload.get("optimizer_state"),
            rng=payload.get("rng"),
            config=payload.get("config"),
            metrics=payload.get("metrics"),
            training_state=payload.get("training_state"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CnnlabError(f"{path} is an incomplete cnnlab checkpoint (missing {exc}): it is corrupt") from None


def resolve_checkpoint_path(run_or_checkpoint: Path) -> Path:
    """A run directory means its best checkpoint; anything else is taken as a checkpoint file."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CnnlabError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt: is it a cnnlab run directory?")
    return path
