"""SIGINT and SIGTERM during `cnnlab train`: the epoch in progress is saved, one line says how to continue."""

import csv
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnnlab.cli import main
from cnnlab.train.checkpoint import load_checkpoint

EPOCHS = 6
FAST = ["--batch-size", "64", "--seed", "1", "--epochs", str(EPOCHS)]


def start_training(runs, name):
    return subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "train", "--runs-dir", str(runs), "--name", name, *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.parametrize("sent, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_epoch_in_progress_and_the_run_resumes_to_the_same_weights(tmp_path, sent, status):
    process = start_training(tmp_path, "cut")
    wait_for(tmp_path / "cut" / "metrics.csv", process)  # written once the first epoch's checkpoints are
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    run = tmp_path / "cut"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    match = re.fullmatch(
        rf"cnnlab: interrupted; finished and saved epoch (\d) of {EPOCHS}; "
        rf"continue with: cnnlab train --resume {re.escape(str(run))} --epochs {EPOCHS}",
        lines[0],
    )
    assert match, lines[0]
    stopped_at = int(match.group(1))
    assert 1 <= stopped_at < EPOCHS
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == stopped_at
    assert not (run / "summary.json").exists()

    assert main(["train", "--resume", str(run), "--epochs", str(EPOCHS)]) == 0
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == list(range(1, EPOCHS + 1))
    assert (run / "summary.json").is_file()
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "straight", *FAST]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model_state
    resumed = load_checkpoint(run / "checkpoints" / "last.pt").model_state
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_second_signal_stops_at_once_and_keeps_the_saved_checkpoint(tmp_path):
    process = start_training(tmp_path, "r")
    wait_for(tmp_path / "r" / "metrics.csv", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: interrupted; "), err
    assert lines[0].endswith(f"continue with: cnnlab train --resume {tmp_path / 'r'} --epochs {EPOCHS}")
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch
    assert saved >= 1 and not list((tmp_path / "r").rglob("*.tmp"))
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "summary.json").is_file()


def test_training_puts_the_previous_signal_handlers_back(tmp_path):
    def mine(signum, frame):
        pass

    previous, sigint = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        assert main(["train", "--runs-dir", str(tmp_path), "--name", "r", "--batch-size", "64", "--epochs", "1"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, previous)
