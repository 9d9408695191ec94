"""The out-of-distribution check and the framing, measured from a run's own data splits."""

from __future__ import annotations

import torch

from cnnlab.data.preprocess import measure_framing
from cnnlab.data.sources import load_splits
from cnnlab.tools.calibrate import FLAG_RATE, OodCheck, calibrate, calibrate_ood
from cnnlab.tools.export import ModelInfo
from cnnlab.tools.predict import Predictor
from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path


def test_the_threshold_flags_the_calibrated_share_of_validation_images():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(1000, 10, generator=generator).softmax(dim=1)  # (1000, 10)
    check = calibrate_ood(probabilities)
    assert check.images == 1000 and check.score == "max_softmax"
    assert abs(check.flag_rate - FLAG_RATE) <= 0.002
    assert float(check.flags(probabilities).double().mean()) == check.flag_rate
    assert OodCheck.from_dict(check.to_dict()) == check


def test_the_run_is_calibrated_on_its_own_splits(trained_run):
    checkpoint = load_checkpoint(resolve_checkpoint_path(trained_run))
    calibration = calibrate(checkpoint, checkpoint.build_model())
    splits = load_splits("digits", None, 0.1, 0)  # the run's defaults: validation share 0.1, seed 0
    assert calibration.framing == measure_framing(splits.train.images)
    assert calibration.ood.images == len(splits.val)
    info = ModelInfo.of(checkpoint, None)
    assert (info.framing, info.ood) == (calibration.framing, calibration.ood)
    assert ModelInfo.from_dict(info.to_dict(), "test") == info


def test_noise_is_flagged_far_more_often_than_test_images(trained_run):
    predictor = Predictor.load(trained_run)
    test_images = load_splits("digits", None, 0.1, 0).test.images  # (360, 1, 28, 28) uint8
    generator = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=generator)
    specks = (torch.rand(300, 1, 28, 28, generator=generator) < 0.1).to(torch.uint8) * 255

    def flagged(images: torch.Tensor) -> float:
        return sum(p.out_of_distribution for p in predictor.predict_batch(images, top_k=1)) / len(images)

    on_test = flagged(test_images)
    assert on_test < 0.1
    assert flagged(noise) > 3 * on_test + 0.2 and flagged(specks) > 3 * on_test + 0.2
