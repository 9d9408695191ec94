"""What prediction needs to know about a model's training data, measured from its checkpoint.

Two things, both recorded in the export (model.json, the ONNX metadata) so that
an exported file serves alone, and found by `calibration_of` for every entry
point (`cnnlab predict`, `cnnlab serve` of a run, `cnnlab export`, `inspect`):

- the framing of the training images (cnnlab/data/preprocess.py), which every
  user image goes through before the model sees it;
- an out-of-distribution check: the largest softmax probability of an input,
  flagged when under a threshold calibrated on the validation split so that
  FLAG_RATE of those images fall under it.

The training and validation splits are the run's own: the checkpoint's
configuration names the dataset, its folder, the validation share and the seed,
and the split is deterministic. Where the dataset is not on this machine, or the
run kept no validation split, the corresponding part is None (images are only
resized; no input is flagged), and the model card says so.

Measuring reads the training split again, so it is done once per checkpoint:
training measures its best checkpoint when it tests it (with the splits it
holds), and the figures are kept beside the file as NAME.pt.calibration.json,
tied to the checkpoint's SHA-256. A checkpoint whose bytes changed, or one
without the file, is measured again on first use and the file written then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.atomicfile import atomic_write_text
from cnnlab.data.dataset import DatasetSplits
from cnnlab.data.preprocess import Framing, measure_framing
from cnnlab.data.sources import load_splits
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import Checkpoint

FLAG_RATE = 0.02  # of validation images flagged out of distribution: the threshold is their 2nd percentile
SCORE = "max_softmax"


@dataclass(frozen=True)
class OodCheck:
    """Flags an input whose largest class probability is under `threshold` (`flag_rate` of the `images`
    validation images were)."""

    threshold: float
    flag_rate: float
    images: int
    score: str = SCORE

    def flags(self, probabilities: torch.Tensor) -> torch.Tensor:
        """probabilities: (N, K) softmax -> (N,) bool, True for inputs unlike the training data."""
        return probabilities.amax(dim=1) < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "flag_rate": self.flag_rate, "images": self.images}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OodCheck:
        if data.get("score") != SCORE:
            raise ValueError(f"unknown out-of-distribution score {data.get('score')!r}")
        return cls(float(data["threshold"]), float(data["flag_rate"]), int(data["images"]))


def calibrate_ood(probabilities: torch.Tensor) -> OodCheck:
    """probabilities: (N, K) softmax of N >= 1 validation images -> the check flagging FLAG_RATE of them."""
    scores = probabilities.amax(dim=1).to(torch.float64)
    threshold = float(torch.quantile(scores, FLAG_RATE))
    return OodCheck(round(threshold, 6), round(float((scores < round(threshold, 6)).double().mean()), 4), len(scores))


@dataclass(frozen=True)
class Calibration:
    framing: Framing | None
    ood: OodCheck | None

    def to_dict(self) -> dict[str, Any]:
        return {"framing": self.framing and self.framing.to_dict(), "ood": self.ood and self.ood.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(None if data.get("framing") is None else Framing.from_dict(data["framing"]),
                   None if data.get("ood") is None else OodCheck.from_dict(data["ood"]))  # fmt: skip


def calibration_of(checkpoint: Checkpoint) -> Calibration:
    """The framing and OOD check of `checkpoint`: kept beside its file, else measured on its own splits (and kept)."""
    kept = _read_kept(checkpoint)
    if kept is not None:
        return kept
    config = checkpoint.config or {}
    try:
        data_dir = config.get("data_dir")
        splits = load_splits(checkpoint.dataset, Path(data_dir) if data_dir else None,
                             float(config.get("val_fraction", 0.1)), int(config.get("seed", 0)))  # fmt: skip
    except CnnlabError:  # the dataset is not on this machine: nothing to keep, it may be there later
        return Calibration(None, None)
    return record_calibration(checkpoint, checkpoint.build_model(), splits)


def record_calibration(checkpoint: Checkpoint, model: nn.Module, splits: DatasetSplits) -> Calibration:
    """Measure `checkpoint` on `splits` (its own; `model`: its model, eval mode, (N, C, H, W) float32 normalized ->
    (N, K) logits) and keep the figures beside its file, where it has one that can be written."""
    calibration = measure(checkpoint, model, splits)
    if checkpoint.source is not None and checkpoint.sha256 is not None:
        try:
            atomic_write_text(_kept_path(checkpoint.source),
                              json.dumps({"sha256": checkpoint.sha256, **calibration.to_dict()}, indent=2) + "\n")  # fmt: skip
        except OSError:  # a read-only run: measured again next time, nothing lost
            pass
    return calibration


def measure(checkpoint: Checkpoint, model: nn.Module, splits: DatasetSplits) -> Calibration:
    """The framing of `splits`' training images and the OOD check of `model` on its validation images."""
    if splits.image_shape != checkpoint.in_shape:
        return Calibration(None, None)
    framing = measure_framing(splits.train.images.cpu())
    if not len(splits.val):
        return Calibration(framing, None)
    device = next(model.parameters()).device
    with torch.inference_mode():
        probabilities = torch.cat([model(checkpoint.normalization.apply(images.to(device))).softmax(dim=1).cpu()
                                   for images in splits.val.images.split(1024)])  # fmt: skip
    return Calibration(framing, calibrate_ood(probabilities))


def _kept_path(checkpoint_path: Path) -> Path:
    return Path(checkpoint_path).with_name(Path(checkpoint_path).name + ".calibration.json")


def _read_kept(checkpoint: Checkpoint) -> Calibration | None:
    """The figures kept beside the checkpoint's file, if they were measured on these very bytes."""
    if checkpoint.source is None:
        return None
    try:
        data = json.loads(_kept_path(checkpoint.source).read_text())
        if data.get("sha256") != checkpoint.sha256:
            return None
        return Calibration.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # missing or damaged: measured again
        return None
