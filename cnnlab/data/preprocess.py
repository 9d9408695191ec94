"""Frame a user's image the way the training images were framed (MNIST-style preprocessing).

MNIST and the datasets made like it show a light digit on a dark ground, cropped
to its strokes, scaled to fill a fixed share of the image and centred by its
centre of mass. A digit a user draws or photographs is none of these: dark ink on
white paper, small or large, anywhere in the picture. `measure_framing` reads
from the training images how they are framed (their background, how much of the
image the content fills, whether it is centred by mass or by its bounding box),
and `frame` brings any grey image to that framing:

1. polarity: the image's background (the median of its border) is made the
   training images' background, inverting the image when they differ;
2. contrast: background to 0, the brightest ink to 255;
3. crop to the content (pixels above CONTENT_LEVEL);
4. resize, keeping the aspect ratio, so that the longer side fills `fill` of the
   output's shorter side;
5. paste it centred on its centre of mass (or bounding box) in the output.

Datasets without a uniform background (photographs, CIFAR) have no framing:
their images are only resized. Everything here is deterministic: numpy and
Pillow, no randomness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

CONTENT_LEVEL = 0.2  # of the ink's contrast: fainter pixels are background when cropping
# A dataset is framed when in its typical (median) image at least UNIFORM_SHARE of the border pixels lie within
# UNIFORM_LEVEL (of 255) of the background: all of them in digits and MNIST, 88% in Fashion-MNIST (clothes touch
# the edges), about 12% in uniform noise; photographs (CIFAR) have no common background.
UNIFORM_LEVEL, UNIFORM_SHARE = 16.0, 0.75
MEASURED = 10_000  # training images measured at most (the first ones): medians settle long before, memory does not
WORK_SIDE = 512  # larger images are shrunk to this longer side before framing (cost, not accuracy)
BACKGROUNDS = ("dark", "light")
CENTRES = ("mass", "box")


@dataclass(frozen=True)
class Framing:
    """How a dataset's grey images are framed: the content on a uniform `background`, its longer side
    `fill` of the image's shorter side, centred by `centre` ("mass" or its bounding "box")."""

    background: str
    fill: float
    centre: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS or self.centre not in CENTRES or not 0 < self.fill <= 1:
            raise ValueError(f"framing {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Framing:
        return cls(str(data["background"]), float(data["fill"]), str(data["centre"]))


def measure_framing(images: torch.Tensor) -> Framing | None:
    """images: (N, 1, H, W) uint8 training images (the first MEASURED of them are read) -> how they are framed;
    None when their background is not uniform (photographs) or they are not grey, and framing would distort them."""
    if images.dim() != 4 or images.shape[1] != 1 or len(images) == 0:
        return None
    pixels = images[:MEASURED, 0].to(torch.float32)  # (N, H, W)
    border = torch.from_numpy(_border(pixels.numpy()))  # (N, 2H+2W-4)
    background = float(border.median())
    if float(((border - background).abs() < UNIFORM_LEVEL).to(torch.float32).mean(dim=1).median()) < UNIFORM_SHARE:
        return None
    ink = (pixels - background).abs()  # (N, H, W), 0 on the background
    content = ink > CONTENT_LEVEL * ink.amax(dim=(1, 2), keepdim=True).clamp(min=1)
    rows, cols = content.any(dim=2), content.any(dim=1)  # (N, H), (N, W)
    kept = rows.any(dim=1)
    if not bool(kept.any()):
        return None
    rows, cols, ink = rows[kept], cols[kept], ink[kept]
    h, w = pixels.shape[1:]
    top, bottom = _first(rows), h - 1 - _first(rows.flip(1))
    left, right = _first(cols), w - 1 - _first(cols.flip(1))
    extent = torch.maximum(bottom - top + 1, right - left + 1).to(torch.float32)
    fill = float(extent.median()) / min(h, w)
    # Which centre puts the content where the training images have it: the one nearer the image centre.
    y, x = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    mass = ink.sum(dim=(1, 2)).clamp(min=1e-6)
    mass_y, mass_x = (ink.sum(2) * y).sum(1) / mass, (ink.sum(1) * x).sum(1) / mass
    box_y, box_x = (top + bottom).float() / 2, (left + right).float() / 2
    centre_y, centre_x = (h - 1) / 2, (w - 1) / 2
    off_mass = float(((mass_y - centre_y) ** 2 + (mass_x - centre_x) ** 2).sqrt().mean())
    off_box = float(((box_y - centre_y) ** 2 + (box_x - centre_x) ** 2).sqrt().mean())
    return Framing(
        "dark" if background < 128 else "light", round(min(fill, 1.0), 4), "mass" if off_mass <= off_box else "box"
    )


def frame(grey: Image.Image, framing: Framing, size: tuple[int, int]) -> np.ndarray:
    """A grey ("L") image of any size -> (H, W) uint8 framed as the training images, `size` = (H, W)."""
    if max(grey.size) > WORK_SIDE:
        grey = grey.copy()
        grey.thumbnail((WORK_SIDE, WORK_SIDE), Image.BILINEAR)
    pixels = _array(grey).astype(np.float32)  # (h, w)
    background = _median(_border(pixels[None])[0])
    if (background < 128) != (framing.background == "dark"):
        pixels, background = 255.0 - pixels, 255.0 - background
    ink = np.abs(pixels - background)
    strongest = float(ink.max())
    height, width = size
    if strongest < 1:  # a blank image: nothing to crop or centre
        return np.full(size, 0 if framing.background == "dark" else 255, dtype=np.uint8)
    ink = np.minimum(ink * (255.0 / strongest), 255.0)  # (h, w): 0 background, 255 the strongest ink
    rows, cols = (
        np.flatnonzero(ink.max(axis=1) > 255 * CONTENT_LEVEL),
        np.flatnonzero(ink.max(axis=0) > 255 * CONTENT_LEVEL),
    )
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = framing.fill * min(height, width) / max(crop.shape)
    new_h, new_w = max(1, min(height, round(crop.shape[0] * scale))), max(1, min(width, round(crop.shape[1] * scale)))
    crop = np.ascontiguousarray(crop, dtype=np.float32)
    resized = _array(Image.frombuffer("F", crop.shape[::-1], crop, "raw", "F", 0, 1).resize((new_w, new_h), Image.BILINEAR))
    if framing.centre == "mass":
        mass = max(float(resized.sum()), 1e-6)
        at_y = float((resized.sum(axis=1) * np.arange(new_h)).sum()) / mass
        at_x = float((resized.sum(axis=0) * np.arange(new_w)).sum()) / mass
    else:
        at_y, at_x = (new_h - 1) / 2, (new_w - 1) / 2
    # Where the crop's top-left corner goes, kept inside the output (MNIST-style images never run off the edge).
    top = min(max(round((height - 1) / 2 - at_y), 0), height - new_h)
    left = min(max(round((width - 1) / 2 - at_x), 0), width - new_w)
    out = np.zeros(size, dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = resized
    if framing.background == "light":
        out = 255.0 - out
    return np.minimum(np.maximum(np.rint(out), 0.0), 255.0).astype(np.uint8)


# The two helpers below do what np.asarray(image) and np.median do, without their general-purpose
# overhead (~10 µs a call), which was most of the time framing a small image took.
def _array(image: Image.Image) -> np.ndarray:
    """A Pillow image of mode "L" or "F" -> (H, W) uint8 or float32, a copy of its pixels."""
    dtype = np.uint8 if image.mode == "L" else np.float32
    return np.frombuffer(image.tobytes(), dtype=dtype).reshape(image.height, image.width)


def _median(values: np.ndarray) -> float:
    """The median of a 1-D array, as np.median gives it (the mean of the two middle values when even)."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (float(ordered[middle - 1]) + float(ordered[middle])) / 2


def _border(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 2H+2W-4): each image's outermost rows and columns."""
    return np.concatenate([pixels[:, 0, :], pixels[:, -1, :], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)


def _first(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) bool, each row with a True -> (N,) int64 index of its first True."""
    return mask.to(torch.uint8).argmax(dim=1)
