import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cnnlab.cli import main
from cnnlab.config import AugmentConfig
from cnnlab.data.augment import (
    BatchAugmenter, affine, affine_matrix, crop_and_flip, erase, random_crop, rectangle_masks,
)  # fmt: skip
from cnnlab.train.checkpoint import load_checkpoint

ALL_ON = AugmentConfig(crop_padding=2, flip=True, rotate=15, translate=0.1, scale=0.1, erase=0.5)


def batch(n=16, c=3, h=12, w=12, seed=0):
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed))


def shifted(x, dy, dx):
    """x moved down by dy and right by dx pixels, zeros coming in."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def test_shape_dtype_and_device_are_kept_and_the_same_seed_repeats():
    x = batch()
    a, b = BatchAugmenter(ALL_ON, 7, "cpu"), BatchAugmenter(ALL_ON, 7, "cpu")
    y = a(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert torch.equal(y, b(x)) and not torch.equal(a(x), y)
    assert not torch.equal(BatchAugmenter(ALL_ON, 8, "cpu")(x), y)


def test_state_dict_restores_the_stream_exactly():
    x = batch()
    augmenter = BatchAugmenter(ALL_ON, 0, "cpu")
    augmenter(x)
    state = augmenter.state_dict()
    assert set(state) == {"generator"} and state["generator"].dtype == torch.uint8
    expected = [augmenter(x) for _ in range(3)]
    restored = BatchAugmenter(ALL_ON, 123, "cpu")
    restored.load_state_dict(state)
    assert all(torch.equal(restored(x), e) for e in expected)


def test_nothing_enabled_changes_nothing():
    x = batch()
    assert torch.equal(BatchAugmenter(AugmentConfig(), 0, "cpu")(x), x)


def test_flip_is_off_unless_asked():
    assert AugmentConfig().flip is False
    x = batch(n=64)
    y = BatchAugmenter(AugmentConfig(crop_padding=1), 0, "cpu")(x)
    assert not any(torch.equal(y[i], x[i].flip(2)) for i in range(64))


def test_flip_mirrors_about_half_the_images():
    x = batch(n=200)
    y = BatchAugmenter(AugmentConfig(flip=True), 0, "cpu")(x)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(200)]
    assert all(f or torch.equal(y[i], x[i]) for i, f in enumerate(flipped))
    assert 70 < sum(flipped) < 130


def test_crop_shifts_each_image_by_whole_pixels_within_the_padding():
    x = batch(n=40, h=9, w=11)
    y = BatchAugmenter(AugmentConfig(crop_padding=2), 3, "cpu")(x)
    seen = set()
    for i in range(40):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(y[i], shifted(x[i], dy, dx))]
        assert shifts, f"image {i} is not a shifted copy"
        seen.add(shifts[0])
    assert len(seen) > 10  # the offsets vary across the batch


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_compiled_crop_and_flip_moves_pixels_as_the_tensor_operations_do(padding):
    """The CPU's compiled pass (float32) against the operators every other device runs (float64 here)."""
    x = batch(n=64, h=9, w=11)
    generator = torch.Generator().manual_seed(padding)
    top, left = (torch.randint(0, 2 * padding + 1, (64,), generator=generator) for _ in range(2))
    flip = torch.rand(64, generator=generator) < 0.5
    compiled = crop_and_flip(x, padding, top, left, flip)
    operators = crop_and_flip(x.double(), padding, top, left, flip)
    assert operators.dtype == torch.float64 and torch.equal(compiled, operators.float())
    mirrored = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    assert torch.equal(compiled, mirrored) == (padding == 0) and flip.any() and not flip.all()


def test_crop_offsets_outside_the_padding_are_refused():
    x, inside = batch(n=2), torch.tensor([0, 2])
    with pytest.raises(IndexError, match="outside the padding"):
        crop_and_flip(x, 1, inside, torch.tensor([0, 3]), torch.zeros(2, dtype=torch.bool))


def test_centre_crop_is_the_identity():
    x = batch()
    centre = torch.full((16,), 3)
    assert torch.equal(random_crop(x, 3, centre, centre), x)


def random_affine(x, angle, zoom, shift):
    """affine() with the matrix of rotation `angle`, `zoom` and `shift` (B, 2), one per image."""
    n, _, h, w = x.shape
    theta = affine_matrix(angle.double().numpy(), zoom.double().numpy(), shift[:, 0].double().numpy(),
                          shift[:, 1].double().numpy(), h / w)  # fmt: skip
    return affine(x, torch.from_numpy(theta).float().view(n, 2, 3))


def test_affine_with_no_motion_is_the_identity_and_a_quarter_turn_is_rot90():
    x = batch(h=10, w=10)
    n = x.shape[0]
    same = random_affine(x, torch.zeros(n), torch.ones(n), torch.zeros(n, 2))
    assert torch.allclose(same, x, atol=1e-5)
    turned = random_affine(x, torch.full((n,), math.pi / 2), torch.ones(n), torch.zeros(n, 2))
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))


def test_affine_shift_moves_by_the_fraction_of_the_size():
    x = batch(h=8, w=10)
    n = x.shape[0]
    moved = random_affine(x, torch.zeros(n), torch.ones(n), torch.tensor([[0.2, 0.25]]).expand(n, 2))
    assert any(torch.allclose(moved, shifted(x, s * 2, s * 2), atol=1e-5) for s in (1, -1))


def test_zoom_in_magnifies_the_centre():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 6:10, 6:10] = 1.0  # a 4x4 square in the middle
    zoomed = random_affine(x, torch.zeros(1), torch.full((1,), 2.0), torch.zeros(1, 2))
    assert zoomed.gt(0.5).sum() == 64  # twice as wide and high


def test_rotation_of_a_wide_image_stays_rigid():
    x = torch.zeros(1, 1, 20, 40)
    x[..., 9:11, :] = 1.0  # a horizontal bar through the centre
    turned = random_affine(x, torch.full((1,), math.pi / 2), torch.ones(1), torch.zeros(1, 2))
    column = turned[0, 0].sum(dim=0).argmax()
    assert turned[0, 0, :, column].gt(0.5).sum() == 20 and turned.gt(0.5).sum() <= 2 * 20 + 4


def test_folding_crop_and_flip_into_the_affine_matrix_equals_applying_them_in_turn():
    """Equal where the crop cuts off nothing: here the outer 3 pixels, as wide as the padding, are zero.
    (Elsewhere the folded version lets pixels the crop would cut off come back into view after a rotation.)"""
    config = AugmentConfig(crop_padding=3, flip=True, rotate=20, translate=0.1, scale=0.2)
    x = F.pad(batch(n=64, h=12, w=16)[..., 3:-3, 3:-3], (3, 3, 3, 3))
    augmenter = BatchAugmenter(config, 5, "cpu")
    state = augmenter.state_dict()
    folded = augmenter(x)
    u = torch.rand((64, 12), generator=torch.Generator().set_state(state["generator"]), dtype=torch.float64).numpy()
    p = torch.from_numpy(augmenter.parameters(u, 12, 16))
    step = random_crop(x, 3, p[:, 0].long(), p[:, 1].long())
    step = torch.where(p[:, 2].bool().view(-1, 1, 1, 1), step.flip(3), step)
    step = affine(step, p[:, 3:9].reshape(-1, 2, 3))
    assert torch.allclose(folded, step, atol=1e-4)
    assert p[:, 2].bool().any() and p[:, 0].ne(3).any()  # both were exercised


def test_erase_zeroes_exactly_the_given_rectangles():
    x = torch.ones(3, 2, 10, 12)
    top, left = np.array([0.0, 4.0, 2.0]), np.array([0.0, 5.0, 11.0])
    h, w = np.array([3.0, 6.0, 0.0]), np.array([2.0, 7.0, 4.0])
    in_rows, in_cols = rectangle_masks(top, left, h, w, 10, 12)
    y = erase(x, torch.from_numpy(in_rows), torch.from_numpy(in_cols))
    expected = torch.ones(3, 2, 10, 12)
    expected[0, :, 0:3, 0:2] = 0
    expected[1, :, 4:10, 5:12] = 0
    assert torch.equal(y, expected)  # height 0: image 2 is untouched


def test_erased_rectangles_have_the_drawn_area_and_stay_inside():
    augmenter = BatchAugmenter(AugmentConfig(erase=0.5), 0, "cpu")
    u = torch.rand((400, 12), generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    top, left, h, w = torch.from_numpy(augmenter.parameters(u, 20, 30)[:, 9:13]).unbind(1)
    chosen = h > 0
    assert 150 < int(chosen.sum()) < 250
    area = (h * w)[chosen] / 600
    assert area.min() >= 0.015 and area.max() <= 0.36
    assert (top >= 0).all() and (top + h <= 20).all() and (left >= 0).all() and (left + w <= 30).all()


def test_erase_probability_one_erases_every_image():
    y = BatchAugmenter(AugmentConfig(erase=1.0), 0, "cpu")(torch.ones(32, 1, 16, 16))
    fraction = (y == 0).flatten(1).float().mean(dim=1)
    assert (fraction >= 0.015).all() and (fraction <= 0.4).all()


def test_training_with_augmentation_records_it_and_resumes_exactly(tmp_path):
    flags = ["--batch-size", "128", "--seed", "1", "--schedule", "step", "--step-size", "1", "--gamma", "0.5",
             "--crop-padding", "2", "--rotate", "10", "--translate", "0.1", "--scale", "0.1",
             "--erase", "0.5"]  # fmt: skip
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "straight", "--epochs", "2", *flags]) == 0
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "split", "--epochs", "1", *flags]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    config = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    expected = {"crop_padding": 2, "flip": False, "rotate": 10.0, "translate": 0.1, "scale": 0.1, "erase": 0.5}
    assert config["augment"] == expected
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model_state
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt").model_state
    assert all(torch.equal(straight[k], split[k]) for k in straight)
