"""Data-parallel training (cnnlab.train.distributed): torchrun jobs of 2 processes on gloo, on digits.

Each job runs `cnnlab train` in 2 processes of one thread each. A digits epoch at
batch 26 is 50 steps (1,295 training images), the last one 21 images split 10 / 11.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.train.checkpoint import load_checkpoint

RUN = ["--no-recipe", "--device", "cpu", "--batch-size", "26", "--lr", "0.02", "--epochs", "1"]
# With augmentation, so that resuming has per-rank random streams to put back; at a constant
# rate, so that a run of 1 epoch may go on to 2 (one-cycle is laid over the planned epochs).
AUGMENTED = [*RUN[:-2], "--schedule", "constant", "--translate", "0.1"]
TIMEOUT = 300  # seconds for one job, on a shared two-core machine

# A rank's entry point for the jobs below that need a rank to misbehave: `cnnlab` itself, with
# CNNLAB_RANK_SEED adding --seed RANK to one rank's command, and CNNLAB_KILL_AT making rank 1
# kill itself (SIGKILL; CNNLAB_SIGNAL: that signal instead) at that batch of the job's first attempt.
# Each rank records its exit status.
RANK_ENTRY = """
import os, signal, sys
from cnnlab.cli import main
from cnnlab.train.progress import Progress

rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
argv = sys.argv[1:]
if os.environ.get("CNNLAB_RANK_SEED") and rank == "1":
    argv += ["--seed", "1"]
kill_at = int(os.environ.get("CNNLAB_KILL_AT", 0))
if kill_at and rank == "1" and attempt == "0":
    done = Progress.batch_done
    count = [0]
    def batch_done(self, loss):
        count[0] += 1
        if count[0] == kill_at:
            open(os.path.join(os.environ["CNNLAB_MARKS"], "killed"), "w").close()
            os.kill(os.getpid(), int(os.environ.get("CNNLAB_SIGNAL", signal.SIGKILL)))
        done(self, loss)
    Progress.batch_done = batch_done
try:
    status = main(argv)
except SystemExit as exc:  # how the ranks but 0 leave when rank 0 refuses the job
    status = exc.code
open(os.path.join(os.environ["CNNLAB_MARKS"], f"status-{rank}-{attempt}"), "w").write(str(status))
sys.exit(status)
"""


def torchrun(tmp_path: Path, *args: str, entry: list[str] | None = None, restarts: int = 0, **env: str):
    """Run a torchrun job of 2 ranks on `cnnlab train args` (or `entry` args); its CompletedProcess."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_MARKS": str(marks), **env}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={restarts}", *(entry or ["-m", "cnnlab"]), "train", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment, check=False)


def rank_entry(tmp_path: Path) -> list[str]:
    script = tmp_path / "rank_entry.py"
    script.write_text(RANK_ENTRY)
    return [str(script)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt").model_state


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A 2-process run of 2 epochs with augmentation, start to finish: what resumed runs must equal."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    job = torchrun(tmp_path, *AUGMENTED, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "whole")
    assert job.returncode == 0, job.stderr
    return tmp_path / "whole"


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_two_processes_train_the_weights_one_process_does(tmp_path, engine):
    assert main(["train", *RUN, "--engine", engine, "--runs-dir", str(tmp_path), "--name", "one"]) == 0
    if engine == "autograd":  # through the launcher, which runs torchrun
        launched = subprocess.run(
            [sys.executable, "-m", "cnnlab", "train", "--nproc", "2", *RUN, "--engine", engine,
             "--runs-dir", str(tmp_path), "--name", "two"],
            capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
        )  # fmt: skip
    else:
        launched = torchrun(tmp_path, *RUN, "--engine", engine, "--runs-dir", str(tmp_path), "--name", "two")
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("test accuracy") == 1  # rank 0 alone reports

    one, two = tmp_path / "one", tmp_path / "two"
    assert max_difference(weights(one), weights(two)) <= 1e-5  # after 50 steps
    summary_one, summary_two = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert (summary_one["world_size"], summary_two["world_size"]) == (1, 2)
    assert "world_size: 2" in (two / "config.yaml").read_text()
    # Validation and test cover each split once: the same predictions, the same counts.
    assert summary_two["test"]["confusion_matrix"] == summary_one["test"]["confusion_matrix"]
    assert summary_two["test_loss"] == pytest.approx(summary_one["test_loss"], rel=1e-4)
    val_one, val_two = (load_checkpoint(run / "checkpoints" / "last.pt").metrics for run in (one, two))
    assert val_two["val_accuracy"] == val_one["val_accuracy"]
    assert val_two["train_accuracy"] == val_one["train_accuracy"]
    assert val_two["train_loss"] == pytest.approx(val_one["train_loss"], rel=1e-4)


def test_a_resumed_job_continues_exactly(tmp_path, uninterrupted):
    first = torchrun(tmp_path, *AUGMENTED, "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "halves")
    assert first.returncode == 0, first.stderr
    second = torchrun(tmp_path, "--resume", str(tmp_path / "halves"), "--epochs", "2")
    assert second.returncode == 0, second.stderr
    resumed, whole = weights(tmp_path / "halves"), weights(uninterrupted)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    ranks = load_checkpoint(tmp_path / "halves" / "checkpoints" / "last.pt").rng["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["augment"], ranks[1]["augment"])


def test_a_killed_rank_is_restarted_from_the_last_checkpoint(tmp_path, uninterrupted):
    # Batch 75 of the job is the 25th of epoch 2: killed mid-epoch, after epoch 1's checkpoint.
    job = torchrun(
        tmp_path, *AUGMENTED, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "killed",
        entry=rank_entry(tmp_path), restarts=1, CNNLAB_KILL_AT="75",
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    marks = tmp_path / "marks"
    assert (marks / "killed").exists() and (marks / "status-0-1").read_text() == "0"
    assert "continues from epoch 1" in job.stdout
    restarted, whole = weights(tmp_path / "killed"), weights(uninterrupted)
    assert all(torch.equal(restarted[k], whole[k]) for k in whole)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_job_resumes_exactly(
    tmp_path, uninterrupted
):
    # SIGTERM to rank 1 during the job's batch 60, the 10th of epoch 2: both ranks stop after it.
    job = torchrun(
        tmp_path, *AUGMENTED, "--epochs", "2", "--runs-dir", str(tmp_path), "--name", "stopped",
        entry=rank_entry(tmp_path), CNNLAB_KILL_AT="60", CNNLAB_SIGNAL=str(int(signal.SIGTERM)),
    )  # fmt: skip
    marks = tmp_path / "marks"
    assert [(marks / f"status-{rank}-0").read_text() for rank in (0, 1)] == ["143", "143"], job.stderr
    last = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert (last.epoch, last.step, last.epoch_begun["batches"]) == (1, 60, 10)
    resumed = torchrun(tmp_path, "--resume", str(tmp_path / "stopped"))
    assert resumed.returncode == 0, resumed.stderr
    finished, whole = weights(tmp_path / "stopped"), weights(uninterrupted)
    assert all(torch.equal(finished[k], whole[k]) for k in whole)


def test_ranks_with_different_options_are_refused_by_rank_0_alone(tmp_path):
    job = torchrun(
        tmp_path, *RUN, "--runs-dir", str(tmp_path), "--name", "mismatched", entry=rank_entry(tmp_path),
        CNNLAB_RANK_SEED="1",
    )  # fmt: skip
    marks = tmp_path / "marks"
    assert [(marks / f"status-{rank}-0").read_text() for rank in (0, 1)] == ["2", "2"]
    errors = [line for line in job.stderr.splitlines() if line.startswith("cnnlab")]
    expected = (
        "cnnlab: error: rank 1's options differ from rank 0's (seed: 1 there, 0 on rank 0): start every rank "
        "with the same command and config file"
    )
    assert errors == [expected]
    assert not (tmp_path / "mismatched").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", str(len(os.sched_getaffinity(0)) + 1)], "processes on this machine, which has"),
        (["--nproc", "2", "--batch-size", "25"], "--batch-size 25 does not split evenly over 2 processes"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_the_launcher_refuses_bad_input_before_starting_a_process(tmp_path, capsys, args, message):
    assert main(["train", "--no-recipe", "--device", "cpu", "--runs-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())


def test_a_run_resumes_only_under_its_world_size(tmp_path, capsys):
    assert main(["train", *RUN, "--runs-dir", str(tmp_path), "--name", "single"]) == 0
    capsys.readouterr()
    assert main(["train", "--nproc", "2", "--resume", str(tmp_path / "single"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        "cnnlab: error: the run was trained by 1 process(es) and this job has 2: its random streams are per "
        "process, so continue it with 1 (cnnlab train --nproc 1 --resume RUN)"
    )
    assert err == [expected]


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_synchronised_batch_norm_normalises_over_the_global_batch(tmp_path, engine):
    # ResNet-8 at the global batch of 64, 3 steps on 179 images, against one process of one thread
    # (as each rank has). Training this network magnifies rounding: one process of two threads parts
    # from it by 1.3e-4 already (docs/distributed.md). Each process's own statistics (32 images) part
    # the weights by 7.4e-3.
    args = [*RUN[:3], "--model", "resnet8", "--batch-size", "64", "--lr", "0.02", "--epochs", "1"]
    args += ["--val-fraction", "0.9", "--engine", engine]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *args, "--runs-dir", str(tmp_path), "--name", "one"]) == 0
    finally:
        torch.set_num_threads(threads)
    job = torchrun(tmp_path, *args, "--sync-bn", "--runs-dir", str(tmp_path), "--name", "two")
    assert job.returncode == 0, job.stderr
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 5e-4
