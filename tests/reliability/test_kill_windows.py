"""A kill between two of a run's writes leaves a run that resumes (or reruns) to the straight run's result.

A kill is simulated in-process: a BaseException raised right after one write, which nothing in
cnnlab catches, so no later write happens (as with SIGKILL between two renames).
"""

import csv

import torch

from cnnlab.cli import main
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.rundir import RunDirectory

FAST = ["--batch-size", "64", "--seed", "0", "--epochs", "4"]


class Killed(BaseException):
    pass


def kill_after(monkeypatch, method, when):
    original = getattr(RunDirectory, method)

    def write_then_die(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if when(*args):
            raise Killed
        return result

    monkeypatch.setattr(RunDirectory, method, write_then_die)


def test_a_kill_between_the_first_best_pt_and_last_pt_leaves_a_run_that_can_go_on(tmp_path, monkeypatch):
    """Epoch 1 saves best.pt, then last.pt: killed in between, neither --resume nor the same command works."""
    command = ["train", "--runs-dir", str(tmp_path), "--name", "r", *FAST]
    kill_after(monkeypatch, "save_checkpoint", lambda kind, checkpoint: kind == "best")
    try:
        main(command)
    except Killed:
        pass
    monkeypatch.undo()
    assert (tmp_path / "r" / "checkpoints" / "best.pt").is_file()
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0 or main(command) == 0


def test_a_kill_between_last_pt_and_metrics_csv_loses_no_epoch(tmp_path, monkeypatch):
    """Epoch 2's last.pt is written, metrics.csv not yet: the resumed run's metrics.csv lacks epoch 2
    (and its best-accuracy bookkeeping misses it, so best.pt can differ from a straight run's)."""
    command = ["train", "--runs-dir", str(tmp_path), "--name", "r", *FAST]
    saves = []
    kill_after(monkeypatch, "save_checkpoint", lambda kind, checkpoint: kind == "last" and saves.append(1) is None and len(saves) == 2)
    try:
        main(command)
    except Killed:
        pass
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").epoch == 2
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    epochs = [int(row["epoch"]) for row in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))]
    assert epochs == [1, 2, 3, 4]
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "straight", *FAST]) == 0
    for name in ("best.pt", "last.pt"):
        straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / name).model_state
        resumed = load_checkpoint(tmp_path / "r" / "checkpoints" / name).model_state
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name


def test_a_kill_while_the_first_config_yaml_is_written_leaves_a_run_that_can_start_again(tmp_path):
    """The run folder holds only `.config.yaml.XXXXXXXX.tmp`: the same command, --overwrite and --resume all refuse it."""
    run = tmp_path / "r"
    run.mkdir()
    (run / ".config.yaml.ab12cd34.tmp").write_text("model: lenet5\n")
    command = ["train", "--runs-dir", str(tmp_path), "--name", "r", *FAST]
    assert main(command) == 0
