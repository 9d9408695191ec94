"""--tensorboard mirrors metrics.csv and diagnostics.json into TensorBoard event files."""

import csv
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.cli import main


def test_the_event_files_hold_each_epochs_metrics_and_layer_figures(tmp_path):
    assert main(["train", "--epochs", "2", "--batch-size", "64", "--runs-dir", str(tmp_path), "--name", "r",
                 "--tensorboard"]) == 0  # fmt: skip
    run = tmp_path / "r"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    for key in ("train_loss", "val_accuracy", "lr"):
        logged = events.Scalars(f"epoch/{key}")
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows]
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)  # stored as float32
    assert {"grad_norm/0", "update_ratio/0"} <= set(events.Tags()["scalars"])  # LeNet-5's first conv
    assert len(events.Scalars("grad_norm/0")) == 2


def test_without_its_package_the_flag_is_one_line_and_no_run_is_made(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert main(["train", "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "r", "--tensorboard"]) == 2
    assert "--tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
