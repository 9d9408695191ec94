"""scikit-learn's bundled 8x8 handwritten digits, the dataset that needs no download.

1,797 real digits at 8x8 with 17 grey levels. They are upscaled to 28x28 so that
the same models run on them as on MNIST, and split into train and test once, by
a fixed stratified cut, so every run and every machine sees the same test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnlab.data.dataset import ImageDataset, split_validation

SIZE = 28
TEST_FRACTION = 0.2
_SPLIT_SEED = 20240601  # fixed: the test set is part of the dataset's definition


def load_digits_splits() -> tuple[ImageDataset, ImageDataset]:
    """(train, test): images (N, 1, 28, 28) uint8, labels (N,) int64, classes '0'..'9'."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    # bunch.images: (1797, 8, 8) float64 in 0..16
    pixels = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0
    # Bilinear upscaling keeps strokes smooth; a 2-pixel border matches MNIST's
    # centred digits with empty margins.
    inner = F.interpolate(pixels, size=(SIZE - 4, SIZE - 4), mode="bilinear", align_corners=False)
    images = F.pad(inner, (2, 2, 2, 2))
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    full = ImageDataset(images, labels, tuple(str(d) for d in range(10)))
    train, test = split_validation(full, TEST_FRACTION, _SPLIT_SEED)
    return train, test
