"""Decode user images (PNG, JPEG, BMP, WebP, ...) into model input, safely.

One code path for files (`cnnlab predict`) and uploads (`cnnlab serve`):
`load_image` reads the file and hands its bytes to `decode_image`. The header
is read and the pixel count checked before any decoding, so a small file that
claims a gigantic size (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnlab.data.preprocess import Framing, frame
from cnnlab.errors import CnnlabError

MAX_PIXELS = 40_000_000  # 40 megapixels: larger than any camera photo a user would classify
# Pillow warns on opening an image of more than its MAX_IMAGE_PIXELS (~89 MP), and refuses one of
# twice that. cnnlab refuses anything past MAX_PIXELS right after reading the header, so the warning
# would only be noise in a server's log or a user's terminal before the clear error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
MAX_FILE_BYTES = 100 * 1024 * 1024
# The formats Pillow may try. Not all it knows: some (EPS) run external programs on the data.
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "PPM")

# Why an image was refused, for callers that answer differently to each (the server's status codes).
TOO_LARGE, TOO_MANY_PIXELS, NOT_AN_IMAGE = "too_large", "too_many_pixels", "not_an_image"


class ImageError(CnnlabError):
    """An image cnnlab will not decode; `reason` is TOO_LARGE, TOO_MANY_PIXELS or NOT_AN_IMAGE."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image(path: Path, in_shape: tuple[int, int, int], framing: Framing | None = None) -> torch.Tensor:
    """The image at `path` as (C, H, W) uint8 for a model taking `in_shape` = (C, H, W); see `decode_image`."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            limit = MAX_FILE_BYTES // 2**20
            raise ImageError(f"{path} is larger than {limit} MiB: not an image cnnlab will decode", TOO_LARGE)
        data = path.read_bytes()
    except FileNotFoundError:
        raise CnnlabError(f"image {path} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}", NOT_AN_IMAGE) from None
    return decode_image(data, in_shape, name=str(path), framing=framing)


def decode_image(
    data: bytes,
    in_shape: tuple[int, int, int],
    name: str = "upload",
    max_pixels: int = MAX_PIXELS,
    framing: Framing | None = None,
) -> torch.Tensor:
    """The encoded image `data` as (C, H, W) uint8 for a model taking `in_shape` = (C, H, W).

    C is 1 (converted to grey) or 3 (converted to RGB). A grey image is framed as
    the training images were when the model records a `framing`
    (cnnlab/data/preprocess.py: polarity, crop, size, centre); otherwise it is
    resized to H x W with bilinear filtering, as the dataset readers do. `name` says which
    image in error messages. Raises ImageError before decoding when the header
    claims more than `max_pixels` pixels, and when `data` is not a readable image.
    The two steps are `open_image` and `image_input`, for a caller that looks at the
    header in between (the server, which decodes small images on its event loop).
    """
    return image_input(open_image(data, name, max_pixels), in_shape, name, framing)


def open_image(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`data`'s header read, and its pixel count checked against `max_pixels`: nothing is decoded yet."""
    with _as_image_errors(name, max_pixels):
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        if image.width * image.height > max_pixels:
            size = f"{image.width}x{image.height}"
            image.close()
            raise ImageError(f"{name} is {size} pixels, over the {max_pixels:,} pixel limit: shrink it first",
                             TOO_MANY_PIXELS)  # fmt: skip
    return image


def image_input(image: Image.Image, in_shape: tuple[int, int, int], name: str = "upload",
                framing: Framing | None = None) -> torch.Tensor:  # fmt: skip
    """An image from `open_image`, decoded, as (C, H, W) uint8 for `in_shape` (see `decode_image`); closes it."""
    channels, height, width = in_shape
    with image, _as_image_errors(name, image.width * image.height):
        if channels not in (1, 3):
            raise CnnlabError(f"the model takes {channels}-channel images; cnnlab converts images to 1 or 3 channels only")
        converted = image.convert("L" if channels == 1 else "RGB")
        if channels == 1 and framing is not None:
            pixels = frame(converted, framing, (height, width))
        else:
            pixels = np.asarray(converted.resize((width, height), Image.BILINEAR), dtype=np.uint8)
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


@contextmanager
def _as_image_errors(name: str, max_pixels: int) -> Iterator[None]:
    """Pillow's many ways of saying an image cannot be read, as ImageError."""
    try:
        yield
    except Image.DecompressionBombError:  # Pillow's own limit, checked while opening: past twice its MAX_IMAGE_PIXELS
        raise ImageError(f"{name} claims more than {max_pixels:,} pixels: shrink it first", TOO_MANY_PIXELS) from None
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object, which says nothing to a user
        message = f"cannot read image {name}: not a PNG, JPEG, BMP, WebP, GIF, TIFF or PPM image"
        raise ImageError(message, NOT_AN_IMAGE) from None
    # Pillow reports corrupt data through all of these, depending on the format and where the damage is.
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot read image {name}: {exc}", NOT_AN_IMAGE) from None
