"""Decode user images (PNG, JPEG, BMP, WebP, ...) into model input, safely.

The header is read and the pixel count checked before any decoding, so a
small file that claims a gigantic size (a decompression bomb) is refused
without allocating it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnlab.errors import CnnlabError

MAX_PIXELS = 40_000_000  # 40 megapixels: larger than any camera photo a user would classify
MAX_FILE_BYTES = 100 * 1024 * 1024


def load_image(path: Path, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """The image at `path` as (C, H, W) uint8 for a model taking `in_shape` = (C, H, W).

    C is 1 (converted to grey) or 3 (converted to RGB); the image is resized to
    H x W with bilinear filtering, as the dataset readers do.
    """
    channels, height, width = in_shape
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CnnlabError(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MiB: not an image cnnlab will decode")
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise CnnlabError(
                    f"{path} is {image.width}x{image.height} pixels, over the {MAX_PIXELS:,} pixel limit: shrink it first"
                )
            converted = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except FileNotFoundError:
        raise CnnlabError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CnnlabError(f"cannot read image {path}: {exc}") from None
    if channels not in (1, 3):
        raise CnnlabError(f"the model takes {channels}-channel images; cnnlab converts images to 1 or 3 channels only")
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()
