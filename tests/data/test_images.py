import struct
import zlib

import pytest
import torch
from PIL import Image

from cnnlab.data.images import load_image
from cnnlab.errors import CnnlabError


def test_rgb_image_becomes_grey_and_is_resized(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    image = load_image(path, (1, 28, 28))
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert int(image[0, 10, 10]) == round(0.299 * 255)  # ITU-R 601 luma of pure red


def test_grey_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.new("L", (32, 32), 128).save(path)
    image = load_image(path, (3, 32, 32))
    assert image.shape == (3, 32, 32)
    assert (image.int() - 128).abs().max() <= 2


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(CnnlabError, match="does not exist"):
        load_image(tmp_path / "absent.png", (1, 28, 28))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(CnnlabError, match="cannot read image"):
        load_image(tmp_path / "text.png", (1, 28, 28))


def test_a_header_claiming_a_gigantic_size_is_refused_before_decoding(tmp_path):
    # A valid PNG signature an IHDR claiming 8000 x 8000 pixels, no pixel data at all.
    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / "bomb.png"
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
    with pytest.raises(CnnlabError, match="over the 40,000,000 pixel limit"):
        load_image(path, (1, 28, 28))
