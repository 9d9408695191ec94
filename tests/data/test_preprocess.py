"""Framing: measured from training images, applied to any grey image, deterministic."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.images import decode_image
from cnnlab.data.preprocess import Framing, frame, measure_framing
from cnnlab.data.sources import load_splits


def users_picture(
    image: torch.Tensor, canvas: tuple[int, int] = (640, 480), at: tuple[int, int] = (30, 150)
) -> Image.Image:
    """(1, 28, 28) uint8 light-on-dark digit -> as a user photographs it: dark ink on white paper, ten times
    larger (280 x 280), off-centre in a `canvas` (W, H) picture whose paper is not quite white."""
    digit = Image.fromarray(255 - image[0].numpy()).resize((280, 280), Image.BILINEAR)
    picture = Image.new("L", canvas, 255)
    picture.paste(digit, at)
    return Image.fromarray(np.clip(np.asarray(picture, dtype=np.int16) - 20, 0, 255).astype(np.uint8))


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", None, 0.1, 0)


def test_the_digits_framing_is_measured_from_their_images(digits):
    framing = measure_framing(digits.train.images)
    # 8x8 digits upscaled to 24 of 28 pixels, centred as a box, light on black
    assert (framing.background, framing.centre) == ("dark", "box") and framing.fill == pytest.approx(24 / 28, abs=0.01)


def test_images_centred_by_mass_on_white_are_measured_so():
    ink = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    ink[:, :, 4:24, 12:16] = 255  # a heavy bar 20 pixels high, centred...
    ink[:, :, 4, 16:25] = 255  # ...with a thin tail to the right: its box is off-centre, its centre of mass is not
    framing = measure_framing(255 - ink)  # dark ink on white
    assert (framing.background, framing.centre) == ("light", "mass") and framing.fill == pytest.approx(
        20 / 28, abs=0.01
    )


def test_images_without_a_common_background_have_no_framing():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=generator)
    assert measure_framing(noise) is None
    assert measure_framing(torch.zeros(10, 3, 32, 32, dtype=torch.uint8)) is None  # colour photographs are not framed


def test_a_users_dark_on_white_off_centre_large_digit_becomes_the_datasets_image(digits):
    framing = measure_framing(digits.train.images)
    differences = []
    for image in digits.test.images[:20]:
        framed = frame(users_picture(image), framing, (28, 28)).astype(np.float32)
        original = image[0].numpy().astype(np.float32)
        assert framed[0, 0] == 0 and framed.max() > 240  # light on black, full contrast
        assert np.corrcoef(framed.ravel(), original.ravel())[0, 1] > 0.75  # the same digit, same place and size
        differences.append(np.abs(framed - original).mean())
    assert np.mean(differences) < 15  # of 255; resampling twice blurs the edges


def test_a_dataset_image_is_nearly_unchanged(digits):
    framing = measure_framing(digits.train.images)
    images = digits.test.images[:50]
    framed = np.stack([frame(Image.fromarray(im[0].numpy()), framing, (28, 28)) for im in images]).astype(np.float32)
    assert np.abs(framed - images[:, 0].numpy()).mean() < 15


def test_framing_is_deterministic_and_decode_image_applies_it(digits):
    framing = measure_framing(digits.train.images)
    data = png(users_picture(digits.test.images[0]))
    first, second = decode_image(data, (1, 28, 28), framing=framing), decode_image(data, (1, 28, 28), framing=framing)
    assert first.shape == (1, 28, 28) and first.dtype == torch.uint8
    assert torch.equal(first, second)
    assert torch.equal(first[0], torch.from_numpy(frame(Image.open(io.BytesIO(data)), framing, (28, 28))))
    unframed = decode_image(data, (1, 28, 28))  # no framing: only resized, still mostly white paper
    assert float(unframed.float().mean()) > 150 > float(first.float().mean())


def test_a_blank_image_is_all_background():
    out = frame(Image.new("L", (50, 40), 200), Framing("dark", 0.8, "mass"), (28, 28))
    assert out.shape == (28, 28) and not out.any()
    light = frame(Image.new("L", (50, 40), 10), Framing("light", 0.8, "mass"), (28, 28))
    assert (light == 255).all()


def test_a_light_framing_keeps_dark_ink_on_white():
    picture = Image.new("L", (100, 60), 0)
    picture.paste(255, (10, 10, 30, 50))  # white ink on black, 20 x 40
    out = frame(picture, Framing("light", 0.5, "box"), (28, 28))
    assert out[0, 0] == 255 and out.min() == 0
    rows, cols = np.flatnonzero((out < 128).any(axis=1)), np.flatnonzero((out < 128).any(axis=0))
    assert rows[-1] - rows[0] + 1 == 14 and cols[-1] - cols[0] + 1 == 7  # longer side 0.5 of 28, aspect kept
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 0.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 0.5


def test_the_fast_helpers_of_frame_give_what_numpy_gives():
    from cnnlab.data.preprocess import _array, _median

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 104, 105):
        values = rng.integers(0, 256, n).astype(np.float32)
        assert _median(values) == float(np.median(values))
    grey = rng.integers(0, 256, (5, 7)).astype(np.uint8)
    assert np.array_equal(_array(Image.fromarray(grey)), grey) and _array(Image.fromarray(grey)).dtype == np.uint8
    floats = rng.random((5, 7)).astype(np.float32)
    assert np.array_equal(_array(Image.fromarray(floats)), floats)
