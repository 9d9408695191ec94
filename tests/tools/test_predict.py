"""Predictor: the probabilities of the trained model itself, through the fast forward, for images framed as
the training images were; `cnnlab predict` says when an image looks unlike them."""

import torch
from PIL import Image, ImageDraw, ImageFont

from cnnlab.data.images import load_image
from cnnlab.data.sources import load_splits
from cnnlab.tools.predict import Predictor
from tests.data.test_preprocess import users_picture


def test_predictions_are_the_models_softmax_top_k(trained_run):
    predictor = Predictor.load(trained_run)
    assert predictor.forward is not predictor.model  # LeNet-5 takes the fast path
    images = load_splits("digits", None, 0.1, 0).test.images[:64]  # (64, 1, 28, 28) uint8
    predictions = predictor.predict_batch(images, top_k=3)

    with torch.inference_mode():
        x = predictor.checkpoint.normalization.apply(images)
        expected = predictor.model(x).softmax(dim=1).topk(3, dim=1)
    assert [p.classes for p in predictions] == [[predictor.classes[i] for i in row] for row in expected.indices.tolist()]
    got = torch.tensor([p.probabilities for p in predictions])
    torch.testing.assert_close(got, expected.values, atol=1e-6, rtol=0)


def test_a_digit_drawn_dark_on_white_off_centre_and_large_is_classified_like_the_dataset_image(trained_run, tmp_path):
    predictor = Predictor.load(trained_run)
    images = load_splits("digits", None, 0.1, 0).test.images[:40]  # (40, 1, 28, 28) uint8, light on black
    originals, pictures = [], []
    for i, image in enumerate(images):
        originals.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image[0].numpy()).save(originals[-1])
        pictures.append(tmp_path / f"picture{i}.png")
        users_picture(image, at=(20 + 7 * i, 190 - 4 * i)).save(pictures[-1])
    expected = [p.classes[0] for p in predictor.predict_files(originals, top_k=1)]
    got = [p.classes[0] for p in predictor.predict_files(pictures, top_k=1)]
    assert sum(a == b for a, b in zip(expected, got)) >= 0.9 * len(images)
    # Only resized, as before framing, the same pictures are mostly misread.
    resized = torch.stack([load_image(p, predictor.in_shape) for p in pictures])
    unframed = [p.classes[0] for p in predictor.predict_batch(resized, top_k=1)]
    assert sum(a == b for a, b in zip(expected, unframed)) < 0.5 * len(images)


def test_digits_typed_in_a_font_are_read_once_framed(trained_run, tmp_path):
    """Pillow's built-in font, black on white, large and off-centre: nothing like the 8x8 handwritten training
    digits but their shape. Framed, most are read right; only resized, almost none are."""
    predictor = Predictor.load(trained_run)
    font = ImageFont.load_default(size=150)
    paths = []
    for digit in range(10):
        picture = Image.new("L", (400, 300), 255)
        ImageDraw.Draw(picture).text((60 + 10 * digit, 40), str(digit), fill=0, font=font)
        paths.append(tmp_path / f"{digit}.png")
        picture.save(paths[-1])
    framed = [p.classes[0] for p in predictor.predict_files(paths, top_k=1)]
    resized = torch.stack([load_image(p, predictor.in_shape) for p in paths])
    unframed = [p.classes[0] for p in predictor.predict_batch(resized, top_k=1)]
    assert sum(c == str(d) for d, c in enumerate(framed)) >= 6
    assert sum(c == str(d) for d, c in enumerate(unframed)) <= 2


def test_the_command_line_says_when_an_image_is_unlike_the_training_images(trained_run, tmp_path, capsys):
    from cnnlab.cli import main

    generator = torch.Generator().manual_seed(0)
    noise = tmp_path / "specks.png"
    specks = (torch.rand(28, 28, generator=generator) < 0.1).to(torch.uint8) * 255
    Image.fromarray(specks.numpy()).save(noise)
    digit = tmp_path / "digit.png"
    Image.fromarray(load_splits("digits", None, 0.1, 0).test.images[0, 0].numpy()).save(digit)
    assert main(["predict", str(trained_run), str(digit), str(noise), "--top-k", "1"]) == 0
    digit_line, noise_line = capsys.readouterr().out.splitlines()
    assert "unlike the training images" in noise_line and "unlike" not in digit_line
    assert main(["predict", str(trained_run), str(noise), "--json"]) == 0
    assert '"out_of_distribution": true' in capsys.readouterr().out
