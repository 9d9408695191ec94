"""The out-of-distribution check and the framing, measured from a run's own data splits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cnnlab.data.preprocess import measure_framing
from cnnlab.data.sources import load_splits
from cnnlab.train import calibrate
from cnnlab.train.calibrate import FLAG_RATE, Calibration, OodCheck, calibrate_ood, calibration_of, measure
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
    splits = load_splits("digits", None, 0.1, 0)  # the run's defaults: validation share 0.1, seed 0
    calibration = measure(checkpoint, checkpoint.build_model(), splits)
    assert calibration.framing == measure_framing(splits.train.images)
    assert calibration.ood.images == len(splits.val)
    info = ModelInfo.of(checkpoint, None)
    assert (info.framing, info.ood) == (calibration.framing, calibration.ood)
    assert ModelInfo.from_dict(info.to_dict(), "test") == info


def test_training_keeps_the_calibration_so_loading_reads_no_data(trained_run, monkeypatch):
    kept = json.loads((trained_run / "checkpoints" / "best.pt.calibration.json").read_text())
    assert kept["sha256"] == (trained_run / "checkpoints" / "best.pt.sha256").read_text().split()[0]

    def no_data(*args, **kwargs):
        raise AssertionError("the training data was read again")

    monkeypatch.setattr(calibrate, "load_splits", no_data)
    checkpoint = load_checkpoint(resolve_checkpoint_path(trained_run))
    assert calibration_of(checkpoint) == Calibration.from_dict(kept)
    assert calibration_of(checkpoint).ood.images == len(load_splits("digits", None, 0.1, 0).val)


@pytest.mark.parametrize("damage", ["other bytes", "garbled"])
def test_a_calibration_of_other_bytes_or_a_damaged_one_is_measured_again(trained_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    kept_path = run / "checkpoints" / "best.pt.calibration.json"
    truth = Calibration.from_dict(json.loads(kept_path.read_text()))
    if damage == "other bytes":  # as after a checkpoint is replaced by a later one
        kept = json.loads(kept_path.read_text())
        kept_path.write_text(json.dumps({**kept, "sha256": "0" * 64, "ood": {**kept["ood"], "threshold": 0.999}}))
    else:
        kept_path.write_text('{"sha256": ')
    assert calibration_of(load_checkpoint(resolve_checkpoint_path(run))) == truth
    assert Calibration.from_dict(json.loads(kept_path.read_text())) == truth  # kept again, right this time


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
