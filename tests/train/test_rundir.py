"""The run directory: what it keeps for --resume, and how it opens a run that was stopped badly."""

import pytest

from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.train.rundir import METRIC_COLUMNS, RunDirectory
from tests.train.test_checkpoint import make_checkpoint


def run_with_epochs(path, epochs):
    """A run directory holding `epochs` saved epochs, as the loop saves them."""
    run = RunDirectory.create(path, overwrite=False)
    run.prepare()
    run.write_config({"epochs": epochs})
    for epoch in range(1, epochs + 1):
        run.save_checkpoint("last", make_checkpoint(epoch))
    return run


def test_saving_last_keeps_the_one_before_as_last_prev(tmp_path):
    run = run_with_epochs(tmp_path / "r", 3)
    assert load_checkpoint(run.checkpoints / "last.pt").epoch == 3
    assert load_checkpoint(run.checkpoints / "last.prev.pt").epoch == 2
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256",
    ]  # fmt: skip


def test_opening_a_run_removes_the_temp_files_a_killed_writer_left(tmp_path):
    run = run_with_epochs(tmp_path / "r", 1)
    stale = [run.checkpoints / ".last.pt.k2j4_a9x.tmp", run.path / ".metrics.csv.0ab1cdef.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (run.path / "notes.tmp").write_text("the user's")
    RunDirectory.open(run.path)
    assert not any(path.exists() for path in stale)
    assert (run.path / "notes.tmp").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before_with_one_warning(tmp_path, damage):
    run = run_with_epochs(tmp_path / "r", 3)
    last = run.checkpoints / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
        last.write_bytes(bytes(data))
    elif damage == "truncate":
        last.write_bytes(bytes(data[:1000]))
    else:
        last.unlink()
    with pytest.warns(UserWarning, match=r"resuming from last.prev.pt \(epoch 2\) instead") as warned:
        opened = RunDirectory.open(run.path)
    assert len(warned) == 1
    assert opened.resume_checkpoint.epoch == 2
    assert load_checkpoint(last).epoch == 2  # what the resume loads is the good one now


def test_with_both_checkpoints_damaged_resume_says_so(tmp_path):
    run = run_with_epochs(tmp_path / "r", 2)
    for name in ("last.pt", "last.prev.pt"):
        (run.checkpoints / name).write_bytes(b"garbage")
    with pytest.raises(CnnlabError, match="has no usable checkpoint to resume from: .*last.pt is corrupt.*last.prev.pt is corrupt"):
        RunDirectory.open(run.path)


def test_a_run_stopped_before_its_first_checkpoint_says_to_start_again(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(CnnlabError, match="stopped before its first epoch was saved.*start it again with the same command"):
        RunDirectory.open(path)


def test_a_new_run_replaces_a_folder_without_checkpoints_but_not_a_run_with_them(tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("epochs: 3\n")
    run = RunDirectory.create(stopped, overwrite=False)
    run.prepare()
    assert not (stopped / "config.yaml").exists()
    (tmp_path / "empty").mkdir()
    RunDirectory.create(tmp_path / "empty", overwrite=False)

    run_with_epochs(tmp_path / "trained", 1)
    with pytest.raises(CnnlabError, match="already exists"):
        RunDirectory.create(tmp_path / "trained", overwrite=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("mine")
    with pytest.raises(CnnlabError, match="already exists"):
        RunDirectory.create(tmp_path / "other", overwrite=False)


def test_a_missing_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CnnlabError, match="does not exist: pass the directory of the run"):
        RunDirectory.open(tmp_path / "nowhere")


def test_a_checkpoint_saved_under_the_old_name_only_is_found(tmp_path):
    """A run from before last.prev.pt existed: last.pt alone, without a sidecar, resumes."""
    path = tmp_path / "old"
    save_checkpoint(path / "checkpoints" / "last.pt", make_checkpoint(4))
    (path / "checkpoints" / "last.pt.sha256").unlink()
    assert RunDirectory.open(path).resume_checkpoint.epoch == 4


def test_metrics_read_back_as_the_same_floats(tmp_path):
    """Resume compares new validation accuracies with these: a rounded 139/144 would break a tie."""
    run = RunDirectory.create(tmp_path / "run", overwrite=False)
    run.prepare()
    row = {column: 139 / 144 for column in METRIC_COLUMNS} | {"epoch": 1}
    run.write_metrics([row])
    assert run.read_metrics() == [row]


def test_a_run_is_held_by_one_process_at_a_time(tmp_path):
    """A second training in the same folder (another --resume, an --overwrite) is refused until the first lets go."""
    import subprocess
    import sys

    first = RunDirectory.create(tmp_path / "run", overwrite=False)
    first.prepare()
    holder = f"from cnnlab.train.rundir import RunDirectory; RunDirectory.create({str(tmp_path / 'run')!r}, overwrite=True)"
    refused = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True)
    assert "another cnnlab process is training in" in refused.stderr
    assert (tmp_path / "run").is_dir()  # --overwrite did not get to replace it
    first.release()
    assert subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True).returncode == 0
