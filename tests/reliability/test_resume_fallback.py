"""--resume of a run whose last checkpoint was damaged: it falls back one epoch, says so, and still ends exactly."""

import csv

import pytest
import torch

from cnnlab.cli import main
from cnnlab.train import loop
from cnnlab.train.checkpoint import load_checkpoint

FAST = ["--batch-size", "64", "--seed", "5", "--epochs", "3"]


def test_a_flipped_byte_in_last_pt_resumes_from_the_epoch_before_to_the_same_weights(tmp_path, capsys, monkeypatch):
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "straight", *FAST]) == 0
    original, saves = loop.save_epoch, []

    def stop_after_second(*args, **kwargs):
        original(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_epoch", stop_after_second)
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "cut", *FAST]) == 130
    monkeypatch.setattr(loop, "save_epoch", original)
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10
    last.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cnnlab: warning")]
    assert len(warnings) == 1 and "last.pt is corrupt" in warnings[0]
    assert "resuming from last.prev.pt (epoch 1) instead" in warnings[0]
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model_state
    resumed = load_checkpoint(last).model_state
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("name", ["last.pt", "last.prev.pt"])
def test_a_stale_temp_file_from_a_killed_save_is_gone_after_resume(tmp_path, name):
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "r", "--batch-size", "64", "--epochs", "2", "--schedule", "step"]) == 0
    stale = tmp_path / "r" / "checkpoints" / f".{name}.x1y2z3w4.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "3"]) == 0
    assert not stale.exists()
