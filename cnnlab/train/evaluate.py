"""Evaluation: loss, accuracy and predictions of a model on one split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.dataset import ImageDataset, Normalization
from cnnlab.fast.forward import fast_forward
from cnnlab.train.metrics import ClassReport, confusion_matrix, per_class_report
from cnnlab.fast.slices import map_slices, slice_count, sliced

# No gradients are kept, so a large batch costs little memory and saves per-batch
# overhead, up to a point: on a CPU LeNet-5's forward is fastest at 256-512 images
# and ~2x slower per image at 1024, fast path or not (bench/inference.py).
EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class Evaluation:
    """loss: mean cross-entropy; predictions: (N,) int64 on the CPU."""

    loss: float
    accuracy: float
    predictions: torch.Tensor


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageDataset, normalization: Normalization) -> Evaluation:
    """Run `model` over `data` (already on the model's device) in eval mode.

    The model's mode is restored afterwards, so this can sit inside a training loop.
    """
    if len(data) == 0:
        return Evaluation(float("nan"), float("nan"), torch.empty(0, dtype=torch.int64))
    was_training = model.training
    model.eval()
    forward = fast_forward(model, data.images.device)  # same numbers as model(x), faster on a CPU
    slices = slice_count(model, data.images.device)

    @torch.inference_mode()  # grad mode is per thread, and the slices run on worker threads
    def loss_and_predictions(_, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(normalization.apply(images))  # (B, C, H, W) uint8 -> (B, K)
        return F.cross_entropy(logits, labels, reduction="sum").to(torch.float64), logits.argmax(dim=1)

    total_loss = torch.zeros((), dtype=torch.float64, device=data.images.device)
    predictions = []
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        images = data.images[start : start + EVAL_BATCH_SIZE]  # (B, C, H, W) uint8
        labels = data.labels[start : start + EVAL_BATCH_SIZE]  # (B,) int64
        # As in training, a CPU's cores each take a slice of the batch (slices.py): the compiled
        # loops of the fast path run on the calling thread only.
        with sliced(len(images), slices) as count:
            for loss, predicted in map_slices(loss_and_predictions, images, labels, count):
                total_loss += loss
                predictions.append(predicted)
    model.train(was_training)
    predicted = torch.cat(predictions).cpu()
    accuracy = (predicted == data.labels.cpu()).to(torch.float64).mean().item()
    return Evaluation(total_loss.item() / len(data), accuracy, predicted)


@dataclass(frozen=True)
class Report:
    """An evaluation with its confusion matrix ((K, K) int64, rows true) and per-class figures."""

    evaluation: Evaluation
    confusion: torch.Tensor
    per_class: list[ClassReport]

    def to_dict(self) -> dict:
        return {
            "loss": self.evaluation.loss,
            "accuracy": self.evaluation.accuracy,
            "per_class": [vars(c) for c in self.per_class],
            "confusion_matrix": self.confusion.tolist(),
        }


    @classmethod
    def of(cls, evaluation: Evaluation, data: ImageDataset) -> Report:
        """The report of `evaluation`, made on `data`."""
        confusion = confusion_matrix(data.labels.cpu(), evaluation.predictions, len(data.classes))
        return cls(evaluation, confusion, per_class_report(confusion, data.classes))


def report(model: nn.Module, data: ImageDataset, normalization: Normalization) -> Report:
    return Report.of(evaluate(model, data, normalization), data)
