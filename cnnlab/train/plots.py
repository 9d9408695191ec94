"""Pictures of a run: training curves and the confusion matrix, as PNG files."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from cnnlab.atomicfile import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, train against validation."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in rows], marker="o", label="train")
    ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in rows], marker="o", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(confusion: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    """(K, K) counts, rows true and columns predicted, with counts written in the cells."""
    plt = _pyplot()
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    if len(classes) <= 20:
        threshold = confusion.max().item() / 2
        for i in ticks:
            for j in ticks:
                value = int(confusion[i, j])
                ax.text(j, i, value, ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
