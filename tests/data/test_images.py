import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

from cnnlab.data.images import NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError, decode_image, load_image
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


def bomb_png(width: int = 8000, height: int = 8000) -> bytes:
    """A valid PNG signature and an IHDR claiming width x height pixels, no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def test_a_header_claiming_a_gigantic_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    with pytest.raises(CnnlabError, match="over the 40,000,000 pixel limit"):
        load_image(path, (1, 28, 28))


def test_decoding_bytes_is_loading_the_file(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8).numpy()).save(path)
    assert torch.equal(decode_image(path.read_bytes(), (3, 28, 28)), load_image(path, (3, 28, 28)))
    assert torch.equal(decode_image(path.read_bytes(), (1, 28, 28)), load_image(path, (1, 28, 28)))


def test_decode_errors_say_which_image_and_why(tmp_path):
    with pytest.raises(ImageError, match="over the 40,000,000 pixel limit") as bomb:
        decode_image(bomb_png(), (1, 28, 28), name="image 2")
    assert bomb.value.reason == TOO_MANY_PIXELS and str(bomb.value).startswith("image 2 is 8000x8000 pixels")
    with pytest.raises(ImageError, match="over the 100 pixel limit"):
        decode_image(bomb_png(11, 10), (1, 28, 28), max_pixels=100)
    png = tmp_path / "grey.png"
    Image.new("L", (32, 32), 7).save(png)
    for data in (b"", b"plain text", png.read_bytes()[:40]):
        with pytest.raises(ImageError, match="cannot read image upload") as broken:
            decode_image(data, (1, 28, 28))
        assert broken.value.reason == NOT_AN_IMAGE and isinstance(broken.value, CnnlabError)


def test_a_header_past_pillows_own_bomb_limit_is_too_many_pixels_not_unreadable():
    width = height = 20_000  # 400 megapixels: Pillow refuses it while opening, before cnnlab's check
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    png = b"\x89PNG\r\n\x1a\n" + ihdr + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    assert width * height > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as refused:
        decode_image(png, (1, 28, 28))
    assert refused.value.reason == TOO_MANY_PIXELS and "pixels" in str(refused.value)


def test_an_image_in_pillows_warning_band_is_refused_without_a_warning(tmp_path):
    """Between Pillow's warning (~89 MP) and its refusal (~179 MP): cnnlab's one error, and nothing else printed,
    even where warnings are errors."""
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    path.write_bytes(bomb_png(10_000, 10_000))
    code = (
        "import sys; from cnnlab.data.images import ImageError, decode_image\n"
        "try:\n"
        f"    decode_image(__import__('pathlib').Path({str(path)!r}).read_bytes(), (1, 28, 28))\n"
        "except ImageError as exc:\n"
        "    print(exc.reason)\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, TOO_MANY_PIXELS, "")
