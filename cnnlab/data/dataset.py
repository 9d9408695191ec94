"""The in-memory dataset every reader produces, and what is derived from it.

A dataset is a pair of tensors held in memory, not a per-sample `Dataset`:
batches are slices of these tensors, which is what makes the training loop
cheap (no per-image Python, no worker processes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from cnnlab.compiled import compiled
from cnnlab.errors import CnnlabError


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels of one split.

    images:  (N, C, H, W) uint8, raw pixels 0..255
    labels:  (N,) int64, each in [0, len(classes))
    classes: class names; label i is classes[i]
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be ({self.images.shape[0]},) int64, got {tuple(self.labels.shape)} {self.labels.dtype}"
            )
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise CnnlabError(
                f"labels run from {int(self.labels.min())} to {int(self.labels.max())} but there are "
                f"{len(self.classes)} classes: the label file does not match the dataset"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.classes)

    def to(self, device: torch.device) -> ImageDataset:
        """The same dataset on `device`; training keeps the whole dataset there, as uint8."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)


@dataclass(frozen=True)
class DatasetSplits:
    """The splits of one dataset, all with the same classes and image shape."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def split_validation(train: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Carve a validation split off `train`, stratified by class and fixed by `seed`.

    Stratifying keeps every class's share the same in both parts, which matters
    for small datasets such as `digits` where a plain random cut can starve a class.
    """
    if not 0.0 <= fraction < 1.0:
        raise CnnlabError(f"--val-fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    val_parts, train_parts = [], []
    for label in range(len(train.classes)):
        members = torch.nonzero(train.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    val_idx = torch.cat(val_parts).sort().values
    train_idx = torch.cat(train_parts).sort().values
    return train.subset(train_idx), train.subset(val_idx)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the training pixels, on the 0..1 scale.

    Stored with the model, so that evaluation and prediction see inputs
    transformed exactly as in training.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: torch.Tensor) -> Normalization:
        """Statistics of (N, C, H, W) uint8 images, computed in float64 in chunks to bound memory."""
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        total_sq = torch.zeros(channels, dtype=torch.float64)
        for chunk in images.split(8192):
            pixels = chunk.to(torch.float64).div_(255.0)
            total += pixels.sum(dim=(0, 2, 3))
            total_sq += pixels.square().sum(dim=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
        return cls(tuple(mean.tolist()), tuple(max(s, 1e-3) for s in std.tolist()))

    def apply(self, images: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, C, H, W) float32, zero mean and unit std per channel.

        With `index` (B,) int64, only images[index] -> (B, C, H, W): a training batch is
        gathered and normalized in one step.
        """
        scale, shift = self._scale_and_shift
        if images.device.type == "cpu":
            # One compiled pass: the gather, the conversion and both operations read and write
            # each pixel once, where PyTorch's operators take four passes (a LeNet-5 batch of
            # 384: 0.1 ms instead of ~0.5 in a training loop). The same float32 operations in
            # the same order, so the same numbers.
            images = images.contiguous()
            if index is None:
                index = torch.arange(len(images))
            out = torch.empty((len(index), *images.shape[1:]), dtype=torch.float32)
            _normalize(images.flatten(2).numpy(), index.numpy(), scale.numpy(), shift.numpy(), out.flatten(2).numpy())
            return out
        if index is not None:
            images = images.index_select(0, index)
        scale, shift = scale.to(images.device).view(1, -1, 1, 1), shift.to(images.device).view(1, -1, 1, 1)
        # In place on a fresh copy: x * scale - shift without two batch-sized temporaries.
        return images.to(torch.float32, copy=True).mul_(scale).sub_(shift)

    @functools.cached_property
    def _scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) float32 each: x = pixel * scale - shift. Kept: a training loop normalizes every batch."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32)
        return scale, shift

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


@compiled
def _normalize(images, index, scale, shift, out):  # pragma: no cover - compiled; tested through Normalization.apply
    """out[b, c, :] = images[index[b], c, :] * scale[c] - shift[c]; images (N, C, P) uint8, out (B, C, P) float32."""
    count, channels, pixels = images.shape
    images, out = images.reshape(-1), out.reshape(-1)
    for b in range(len(index)):
        source = index[b]
        if source < 0 or source >= count:  # the loop reads memory unchecked: a bad index must not get there
            raise IndexError("image index out of range")
        for c in range(channels):
            multiply, subtract = scale[c], shift[c]
            # Unsigned offsets: numba wraps a negative signed index around the end, a check per
            # element that keeps LLVM from vectorizing the loop (7x slower).
            read, write = np.uint64((source * channels + c) * pixels), np.uint64((b * channels + c) * pixels)
            for p in range(pixels):
                out[write + np.uint64(p)] = np.float32(images[read + np.uint64(p)]) * multiply - subtract
