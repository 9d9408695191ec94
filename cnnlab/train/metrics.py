"""Classification metrics from predictions: confusion matrix, per-class precision, recall and F1."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    flat = targets.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass(frozen=True)
class ClassReport:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


def per_class_report(confusion: torch.Tensor, classes: tuple[str, ...]) -> list[ClassReport]:
    """Precision, recall and F1 of each class; 0 where a ratio has nothing to divide by."""
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positive / actual.clamp_min(1), torch.zeros_like(actual))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-12), torch.zeros_like(denominator))
    return [
        ClassReport(name, float(p), float(r), float(f), int(s))
        for name, p, r, f, s in zip(classes, precision, recall, f1, actual)
    ]
