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


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight == 1 epoch, then --resume --epochs 2: bit-identical weights.

    One-cycle and cosine schedules are laid over the number of epochs a run is
    started with, so a 1-epoch run differs from a 2-epoch one by design; a
    step-wise schedule does not, which makes 1 + 1 == 2 testable literally.
    """
    recipe = ["--schedule", "step", "--step-size", "1", "--gamma", "0.5", "--label-smoothing", "0.1"]
    assert train(tmp_path, "straight", "--epochs", "2", *recipe) == 0
    assert train(tmp_path, "split", "--epochs", "1", *recipe) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
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


def test_resume_refuses_to_change_the_recipe(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "2", "--lr", "1"]) == 2
    assert "only --epochs and --device may change" in capsys.readouterr().err


def test_resume_of_a_finished_run_asks_for_more_epochs(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "already has 1 epochs: pass --epochs N with N > 1" in capsys.readouterr().err


def test_a_diverging_run_stops_with_advice(tmp_path):
    from cnnlab.config import TrainConfig
    from cnnlab.train.loop import fit
    from cnnlab.train.progress import Progress
    from cnnlab.train.rundir import RunDirectory

    config = TrainConfig(epochs=1, batch_size=64, runs_dir=str(tmp_path))
    config.optim.lr, config.optim.schedule = 1e6, "constant"
    with pytest.raises(CnnlabError, match="training diverged; lower --lr"):
        fit(config, RunDirectory.create(tmp_path / "d", overwrite=False), Progress())
