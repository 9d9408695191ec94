"""What prediction needs to know about a model's training data, measured from its checkpoint.

Two things, both recorded in the export (model.json, the ONNX metadata) so that
an exported file serves alone, and computed by this one function for every
entry point (`cnnlab predict`, `cnnlab serve` of a run, `cnnlab export`):

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def calibrate(checkpoint: Checkpoint, model: nn.Module) -> Calibration:
    """The framing of the checkpoint's training split and the OOD check on its validation split (`model`: the
    checkpoint's, eval mode, (N, C, H, W) float32 normalized -> (N, K) logits)."""
    config = checkpoint.config or {}
    try:
        data_dir = config.get("data_dir")
        splits = load_splits(checkpoint.dataset, Path(data_dir) if data_dir else None,
                             float(config.get("val_fraction", 0.1)), int(config.get("seed", 0)))  # fmt: skip
    except CnnlabError:  # the dataset is not on this machine
        return Calibration(None, None)
    if splits.image_shape != checkpoint.in_shape:
        return Calibration(None, None)
    framing = measure_framing(splits.train.images)
    if not len(splits.val):
        return Calibration(framing, None)
    with torch.inference_mode():
        probabilities = torch.cat([model(checkpoint.normalization.apply(images)).softmax(dim=1)
                                   for images in splits.val.images.split(1024)])  # fmt: skip
    return Calibration(framing, calibrate_ood(probabilities))
