"""SIGINT and SIGTERM during `cnnlab train`: the step in progress finishes, the run is saved there, and one
line says how to continue; the resumed run ends with the weights and metrics of an uninterrupted one."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnnlab.cli import main
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.progress import Progress

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
def test_a_signal_saves_the_step_in_progress_and_the_run_resumes_to_the_same_weights(tmp_path, sent, status):
    process = start_training(tmp_path, "cut")
    wait_for(tmp_path / "cut" / "metrics.csv", process)  # written once the first epoch's checkpoints are
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    run = tmp_path / "cut"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    # Most often inside an epoch; between two (while one is validated and saved) the epoch is whole.
    match = re.fullmatch(
        rf"cnnlab: interrupted; (?:saved after (\d+) batches of epoch (\d)|finished and saved epoch (\d)) of {EPOCHS}; "
        rf"continue with: cnnlab train --resume {re.escape(str(run))} --epochs {EPOCHS}",
        lines[0],
    )
    assert match, lines[0]
    batches, within, whole = match.groups()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    if whole:
        assert 1 <= int(whole) < EPOCHS and last.epoch == int(whole) and last.epoch_begun is None
    else:
        assert 2 <= int(within) <= EPOCHS and last.epoch == int(within) - 1
        assert last.epoch_begun["batches"] == int(batches) >= 1
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


@pytest.mark.parametrize(
    "sent, flags",
    [(signal.SIGINT, ["--ema", "0.9", "--translate", "0.1", "--dropout", "0.2"]), (signal.SIGTERM, ["--engine", "manual"])],
    ids=["SIGINT-ema-augment-dropout", "SIGTERM-manual"],
)
def test_a_run_stopped_inside_an_epoch_resumes_there_exactly(tmp_path, monkeypatch, sent, flags):
    """The signal lands after batch 7 of epoch 2 (of 21): the resumed run trains batches 8-21 of the same order,
    with every random stream where it was, and ends as the uninterrupted run did, metrics included."""
    common = ["--batch-size", "64", "--epochs", "3", "--seed", "1", *flags]
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "straight", *common]) == 0
    done = {"batches": 0}
    original = Progress.batch_done

    def signal_at_epoch_2_batch_7(self, loss=None):
        original(self, loss)
        done["batches"] += 1
        if done["batches"] == 21 + 7:  # 1,295 images in batches of 64: 21 an epoch
            os.kill(os.getpid(), sent)

    monkeypatch.setattr(Progress, "batch_done", signal_at_epoch_2_batch_7)
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "cut", *common]) == 128 + sent
    monkeypatch.setattr(Progress, "batch_done", original)
    cut = tmp_path / "cut"
    last = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert (last.epoch, last.step, last.epoch_begun["batches"]) == (1, 21 + 7, 7)
    assert load_checkpoint(cut / "checkpoints" / "best.pt").epoch == 1

    assert main(["train", "--resume", str(cut)]) == 0
    straight = tmp_path / "straight"
    for kind in ("last", "best"):
        a, b = load_checkpoint(straight / "checkpoints" / f"{kind}.pt"), load_checkpoint(cut / "checkpoints" / f"{kind}.pt")
        for state in ("model_state", "training_state"):
            for key in getattr(a, state) or {}:
                assert torch.equal(getattr(a, state)[key], getattr(b, state)[key]), (kind, state, key)
    timing = {"seconds", "images_per_s"}
    rows = [csv.DictReader(open(run / "metrics.csv")) for run in (straight, cut)]
    for a, b in zip(*rows, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    figures = [json.loads((run / "diagnostics.json").read_text())["epochs"] for run in (straight, cut)]
    assert [e["epoch"] for e in figures[1]] == [1, 2, 3] and figures[0] == figures[1]
    assert json.loads((cut / "summary.json").read_text())["test_accuracy"] == json.loads(
        (straight / "summary.json").read_text())["test_accuracy"]  # fmt: skip
