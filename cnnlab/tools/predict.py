"""Prediction: a trained model plus its preprocessing, from images to top-k classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.data.images import load_image
from cnnlab.train.calibrate import OodCheck
from cnnlab.tools.export import ModelInfo
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path
from cnnlab.fast.forward import fast_forward


@dataclass(frozen=True)
class Prediction:
    classes: list[str]  # most likely first
    probabilities: list[float]
    out_of_distribution: bool | None  # None: the model has no calibrated check

    def to_dict(self) -> dict:
        return {"classes": self.classes, "probabilities": self.probabilities,
                "out_of_distribution": self.out_of_distribution}  # fmt: skip


def top_predictions(
    probabilities: torch.Tensor, classes: tuple[str, ...], top_k: int, ood: OodCheck | None = None
) -> list[Prediction]:
    """probabilities: (N, K) -> for each image its top_k classes (at most K), most likely first, and its OOD flag."""
    top = probabilities.topk(min(top_k, len(classes)), dim=1)
    flags = [None] * len(probabilities) if ood is None else ood.flags(probabilities).tolist()
    return [
        Prediction([classes[i] for i in indices.tolist()], [round(p, 6) for p in values.tolist()], flag)
        for values, indices, flag in zip(top.values, top.indices, flags)
    ]


class Predictor:
    """Pre-process -> forward -> post-process, with the preprocessing the model was trained with (ModelInfo's:
    what `cnnlab export` records and `cnnlab serve` applies)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.info = ModelInfo.of(checkpoint, None)
        self.model = checkpoint.build_model()  # eval mode, CPU
        self.forward = fast_forward(self.model)  # model(x), faster on a CPU (cnnlab/fast/forward.py)
        self.in_shape = checkpoint.in_shape
        self.classes = checkpoint.classes

    @classmethod
    def load(cls, run_or_checkpoint: Path) -> Predictor:
        return cls(load_checkpoint(resolve_checkpoint_path(run_or_checkpoint)))

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor, top_k: int) -> list[Prediction]:
        """images: (N, C, H, W) uint8 in the model's input shape."""
        logits = self.forward(self.checkpoint.normalization.apply(images))  # (N, K)
        return top_predictions(logits.softmax(dim=1), self.classes, top_k, self.info.ood)

    def predict_files(self, paths: list[Path], top_k: int) -> list[Prediction]:
        images = torch.stack([load_image(p, self.in_shape, self.info.framing) for p in paths])  # (N, C, H, W) uint8
        return self.predict_batch(images, top_k)
