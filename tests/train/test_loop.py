import csv
import json

import pytest
import torch
import yaml

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import load_checkpoint

FAST = ["--batch-size", "64", "--seed", "3"]


def train(runs, name, *flags):
    return main(["train", "--runs-dir", str(runs), "--name", name, *FAST, *flags])


def weights(run_dir, kind="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{kind}.pt").model_state


def test_a_run_directory_holds_config_metrics_checkpoints_plots_and_confusion(tmp_path):
    assert train(tmp_path, "r", "--epochs", "2", "--lr", "0.02") == 0
    run = tmp_path / "r"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["optim"]["lr"] == 0.02 and config["batch_size"] == 64
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["images_per_s"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    for name in ("curves.png", "confusion_matrix.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = list(csv.reader(open(run / "confusion_matrix.csv")))
    assert len(confusion) == 11 and sum(int(v) for row in confusion[1:] for v in row[1:]) == 359
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1 and summary["versions"]["torch"] == torch.__version__
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.metrics["val_accuracy"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows), rel=1e-5)


def test_the_same_seed_gives_the_same_weights(tmp_path):
    assert train(tmp_path, "a", "--epochs", "1") == 0
    assert train(tmp_path, "b", "--epochs", "1") == 0
    for key, value in weights(tmp_path / "a").items():
        assert torch.equal(value, weights(tmp_path / "b")[key]), key


@pytest.mark.parametrize("averaging", [[], ["--ema", "0.9"]], ids=["raw", "ema"])
def test_resume_continues_exactly(tmp_path, averaging):
    """2 epochs straight == 1 epoch, then --resume --epochs 2: bit-identical weights (and average).

    One-cycle and cosine schedules are laid over the number of epochs a run is
    started with, so a 1-epoch run differs from a 2-epoch one by design; a
    step-wise schedule does not, which makes 1 + 1 == 2 testable literally.
    """
    recipe = ["--schedule", "step", "--step-size", "1", "--gamma", "0.5", "--label-smoothing", "0.1", *averaging]
    assert train(tmp_path, "straight", "--epochs", "2", *recipe) == 0
    assert train(tmp_path, "split", "--epochs", "1", *recipe) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight, split = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "split"))
    for key in straight.model_state:
        assert torch.equal(straight.model_state[key], split.model_state[key]), key
    assert (straight.training_state is None) == (not averaging) == (split.training_state is None)
    for key in straight.training_state or {}:
        assert torch.equal(straight.training_state[key], split.training_state[key]), key
    assert yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["epochs"] == 2


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    """Kill a 2-epoch run after its first epoch; resuming it matches the uninterrupted run exactly."""
    from cnnlab.train import loop

    assert train(tmp_path, "straight", "--epochs", "2") == 0
    original = loop.train_one_epoch
    calls = {"n": 0}

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupt_second_epoch)
    assert train(tmp_path, "cut", "--epochs", "2") == 130
    monkeypatch.setattr(loop, "train_one_epoch", original)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt").epoch == 1
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_with_ema_the_average_is_validated_saved_and_tested(tmp_path, engine):
    """--ema: each epoch's validation is the averaged weights', and so are the checkpoints' model weights."""
    from cnnlab.data.sources import load_splits
    from cnnlab.train.evaluate import evaluate

    assert train(tmp_path, "r", "--epochs", "2", "--ema", "0.9", "--engine", engine) == 0
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert last.training_state is not None
    assert any(not torch.equal(last.model_state[k], last.training_state[k]) for k in last.model_state)
    val = load_splits("digits", None, 0.1, 3).val
    raw = last.build_model()
    raw.load_state_dict(last.training_state)
    on_average, on_raw = (evaluate(m, val, last.normalization) for m in (last.build_model(), raw))
    # The average follows the trained weights (chance is 10%), and is what was validated.
    assert on_average.accuracy > 0.3 and abs(on_average.accuracy - on_raw.accuracy) < 0.1
    assert last.metrics["val_loss"] == pytest.approx(on_average.loss, rel=1e-6)
    assert last.metrics["val_loss"] != pytest.approx(on_raw.loss, rel=1e-6)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    test = load_splits("digits", None, 0.1, 3).test
    assert summary["test_accuracy"] == evaluate(best.build_model(), test, best.normalization).accuracy


def test_ema_outside_zero_to_one_is_refused(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1", "--ema", "1") == 2
    assert "--ema must be in [0, 1)" in capsys.readouterr().err


def test_resume_refuses_to_change_the_recipe(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "2", "--lr", "1"]) == 2
    assert "only --epochs and --device may change" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_it_is_finished_and_how_to_train_longer(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "is finished: its 1 epochs are trained and tested, so there is nothing to resume" in error
    assert "to train longer, start a new run with the --epochs you want" in error


def test_a_diverging_run_stops_with_advice(tmp_path):
    from cnnlab.config import TrainConfig
    from cnnlab.train.loop import fit
    from cnnlab.train.progress import Progress
    from cnnlab.train.rundir import RunDirectory

    config = TrainConfig(epochs=1, batch_size=64, runs_dir=str(tmp_path))
    config.optim.lr, config.optim.schedule = 1e6, "constant"
    with pytest.raises(CnnlabError, match="training diverged; lower --lr"):
        fit(config, RunDirectory.create(tmp_path / "d", overwrite=False), Progress())


def test_without_a_validation_split_the_latest_epoch_is_the_best(tmp_path):
    assert train(tmp_path, "r", "--epochs", "2", "--val-fraction", "0") == 0
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    assert best.epoch == 2
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["best_epoch"] == 2


def test_one_epoch_takes_steps_per_epoch_steps_from_the_step_it_is_given():
    from cnnlab.config import TrainConfig
    from cnnlab.data.sources import load_splits
    from cnnlab.train.loop import EpochSoFar, prepare, train_one_epoch
    from cnnlab.train.progress import Progress

    config = TrainConfig(epochs=2, batch_size=100, device="cpu")
    splits = load_splits("digits", None, config.val_fraction, config.seed)
    setup = prepare(config, splits=splits, device=torch.device("cpu"), progress=Progress(quiet=True), resume=None)
    assert setup.steps_per_epoch == -(-len(splits.train) // 100) and setup.total_steps == 2 * setup.steps_per_epoch
    so_far = EpochSoFar(setup.shuffle.get_state())
    order = torch.randperm(len(setup.data), generator=setup.shuffle)
    step = train_one_epoch(setup, order, so_far, step=setup.steps_per_epoch)
    assert step == 2 * setup.steps_per_epoch and so_far.batches == setup.steps_per_epoch
    assert so_far.loss_sum > 0 and 0 <= so_far.correct <= len(setup.data)


def resume_in_process(run_dir, epochs=None):
    """--resume through the training layer: RunDirectory.open, the saved config, fit."""
    from cnnlab.config import resolve_config
    from cnnlab.train.loop import fit
    from cnnlab.train.progress import Progress
    from cnnlab.train.rundir import RunDirectory

    run = RunDirectory.open(run_dir)
    checkpoint = run.resume_checkpoint
    config = resolve_config(checkpoint.config, {"epochs": epochs} if epochs else {}, recipe=False)
    return fit(config, run, Progress(quiet=True), resume=checkpoint)


def test_a_run_killed_after_its_last_epoch_but_before_its_test_resumes_to_the_test(tmp_path):
    assert train(tmp_path, "r", "--epochs", "2") == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    for name in ("summary.json", "curves.png", "confusion_matrix.png", "confusion_matrix.csv"):
        (run / name).unlink()
    result = resume_in_process(run)
    assert [int(r["epoch"]) for r in result.rows] == [1, 2]
    again = json.loads((run / "summary.json").read_text())
    assert again["test_accuracy"] == summary["test_accuracy"] and again["best_epoch"] == summary["best_epoch"]
    assert (run / "curves.png").is_file() and (run / "confusion_matrix.png").is_file()
    with pytest.raises(CnnlabError, match="is finished: its 2 epochs are trained and tested"):
        resume_in_process(run)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_more_epochs_under_a_schedule_laid_over_the_run_is_refused_before_anything_changes(tmp_path, capsys, schedule):
    assert train(tmp_path, "r", "--epochs", "1", "--schedule", schedule) == 0
    capsys.readouterr()
    config_before = (tmp_path / "r" / "config.yaml").read_text()
    last_before = (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CnnlabError, match=f"follows a {schedule} learning-rate schedule laid over 1 epochs; --epochs 3"):
        resume_in_process(tmp_path / "r", epochs=3)
    assert (tmp_path / "r" / "config.yaml").read_text() == config_before
    assert (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes() == last_before


def test_an_interrupted_run_resumes_with_a_length_dependent_schedule_when_the_length_stays(tmp_path):
    """Stopped after epoch 1 of 3 (one-cycle): --resume --epochs 3 is allowed and ends where a straight run ends."""
    from cnnlab.train import loop

    assert train(tmp_path, "straight", "--epochs", "3") == 0
    original = loop.save_epoch
    calls = {"n": 0}

    def stop_after_first(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    loop.save_epoch = stop_after_first
    try:
        assert train(tmp_path, "cut", "--epochs", "3") == 130
    finally:
        loop.save_epoch = original
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3"]) == 0
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_full_disk_while_saving_an_epoch_is_one_line_that_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import errno
    import os
    import re

    from cnnlab import atomicfile

    real_fsync, saves = os.fsync, []

    def fsync(fd):
        if re.search(r"/\.last\.pt\.[a-z0-9_]{8}\.tmp$", os.readlink(f"/proc/self/fd/{fd}")):
            saves.append(fd)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomicfile.os, "fsync", fsync)
    assert train(tmp_path, "r", "--epochs", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert err[0].endswith(f"then continue with: cnnlab train --resume {tmp_path / 'r'} --epochs 3")
    monkeypatch.setattr(atomicfile.os, "fsync", real_fsync)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch == 1
    assert not [p for p in (tmp_path / "r").rglob("*.tmp")]
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0


def test_a_new_run_replaces_one_that_stopped_before_its_first_checkpoint(tmp_path):
    stopped = tmp_path / "r"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("epochs: 1\n")
    assert train(tmp_path, "r", "--epochs", "1") == 0
    assert (stopped / "summary.json").is_file()
