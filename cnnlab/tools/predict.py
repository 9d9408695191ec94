"""Prediction: a trained model plus its preprocessing, from images to top-k classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.data.images import load_image
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path
from cnnlab.fast.forward import fast_forward


@dataclass(frozen=True)
class Prediction:
    classes: list[str]  # most likely first
    probabilities: list[float]

    def to_dict(self) -> dict:
        return {"classes": self.classes, "probabilities": self.probabilities}


def top_predictions(probabilities: torch.Tensor, classes: tuple[str, ...], top_k: int) -> list[Prediction]:
    """probabilities: (N, K) -> for each image its top_k classes (at most K), most likely first."""
    top = probabilities.topk(min(top_k, len(classes)), dim=1)
    return [
        Prediction([classes[i] for i in indices.tolist()], [round(p, 6) for p in values.tolist()])
        for values, indices in zip(top.values, top.indices)
    ]


class Predictor:
    """Pre-process -> forward -> post-process, with the preprocessing the model was trained with."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
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
        return top_predictions(logits.softmax(dim=1), self.classes, top_k)

    def predict_files(self, paths: list[Path], top_k: int) -> list[Prediction]:
        images = torch.stack([load_image(p, self.in_shape) for p in paths])  # (N, C, H, W) uint8
        return self.predict_batch(images, top_k)
