"""The run directory: the one place a training run writes its files.

runs/<name>/
  config.yaml             the resolved configuration (usable again with --config)
  metrics.csv             one row per epoch
  checkpoints/last.pt     after every epoch; what --resume continues from
  checkpoints/last.prev.pt   the epoch before: --resume falls back to it if last.pt is damaged
  checkpoints/best.pt     the epoch with the best validation accuracy
  checkpoints/*.pt.sha256    each checkpoint's digest, checked when it loads
  curves.png              loss and accuracy per epoch
  confusion_matrix.png / .csv   on the test split
  summary.json            test metrics, per-class report, versions

Every file is written atomically, so a run killed at any moment keeps the
previous version of each file; opening a run to resume it removes the temporary
files such a kill leaves.
"""

from __future__ import annotations

import atexit
import csv
import fcntl
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

from cnnlab.atomicfile import atomic_write_text, is_temp_file, remove_stale_temp_files
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import Checkpoint, copy_checkpoint, load_checkpoint, save_checkpoint

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "images_per_s",
)  # fmt: skip
OPTIONAL_COLUMNS = ("l1_penalty",)  # written when the rows have them (--l1)


# The runs this process holds: resolved path -> [open lock file, how many RunDirectory objects hold it].
# What is still held when the process ends is let go then (the kernel drops an flock with its file).
_HELD: dict[Path, list] = {}


@atexit.register
def _release_all() -> None:
    for lock, _ in _HELD.values():
        lock.close()
    _HELD.clear()


class RunDirectory:
    writes = True  # False on the ranks of a data-parallel job other than 0 (cnnlab.train.distributed)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._fresh = False
        self.resume_checkpoint: Checkpoint | None = None  # set by open()
        self._lock: Any = None  # the open lock file while this process holds the run (see `claim`)

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDirectory:
        """A new run at `path`; checked now, made on disk only by `prepare()`.

        Deferring the folder until the data and model have loaded means a run
        that fails on bad input leaves nothing behind, and an --overwrite run
        that fails early keeps the run it would have replaced.
        """
        path = Path(path)
        run = cls(path)
        if path.exists():  # a run there may be training: refuse now, before replacing it is even planned
            run.claim()
        # A run stopped before its first checkpoint has nothing to lose or continue: a new run replaces it.
        if path.exists() and not _holds_a_stopped_run_without_checkpoints(path):
            if not overwrite:
                raise CnnlabError(
                    f"run directory {path} already exists: choose another --name, pass --overwrite, "
                    f"or continue it with --resume {path}"
                )
            if not (path / "config.yaml").is_file() and any(path.iterdir()):
                raise CnnlabError(f"{path} exists and is not a cnnlab run directory; --overwrite only replaces runs")
        run._fresh = True
        return run

    def claim(self) -> None:
        """Hold the run for this process until `release` (or its end, however it ends): one training per run.

        An flock on a file beside the folder, so that it outlives the folder being replaced
        (--overwrite) and is let go by the kernel even when the process is killed. Within one
        process a run may be held by several RunDirectory objects (a run made, then reopened).
        """
        if self._lock is not None:
            return
        key = self.path.resolve()
        if key not in _HELD:
            key.parent.mkdir(parents=True, exist_ok=True)
            lock = open(key.with_name(f".{key.name}.lock"), "a")  # noqa: SIM115 - open while the run is held
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                raise CnnlabError(
                    f"another cnnlab process is training in {self.path}: wait for it to end or stop it, "
                    "or train into another --name"
                ) from None
            _HELD[key] = [lock, 0]
        _HELD[key][1] += 1
        self._lock = key

    def release(self) -> None:
        """Let go of the run; when no object of this process holds it, another process may have it."""
        if self._lock is None:
            return
        held = _HELD[self._lock]
        held[1] -= 1
        if held[1] == 0:
            held[0].close()  # closing the file drops the flock
            del _HELD[self._lock]
        self._lock = None

    def prepare(self) -> None:
        """Make a new run's folder, replacing an old run there; nothing to do for a resumed run."""
        if not self._fresh:
            return
        self.claim()  # before the folder is replaced or made: two new runs of one name race here
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self._fresh = False

    @classmethod
    def open(cls, path: Path) -> RunDirectory:
        """An existing run, to resume: its killed writers' temporary files removed, and
        checkpoints/last.pt the newest checkpoint that passes its checks.

        If last.pt is damaged or missing, last.prev.pt (one epoch older) takes its place,
        with a warning; `resume_checkpoint` is the checkpoint loaded.
        """
        run = cls(path)
        if not run.path.is_dir():
            raise CnnlabError(f"{path} does not exist: pass the directory of the run to continue")
        run.claim()  # before anything is removed: the temporary files could be another process's
        for folder in (run.path, run.checkpoints):
            if folder.is_dir():
                remove_stale_temp_files(folder)
        run.resume_checkpoint = run._newest_good_checkpoint()
        return run

    def _newest_good_checkpoint(self) -> Checkpoint:
        last, previous = self.checkpoints / "last.pt", self.checkpoints / "last.prev.pt"
        if not last.is_file() and not previous.is_file():
            if (self.path / "config.yaml").is_file():
                raise CnnlabError(
                    f"{self.path} has no checkpoint: the run stopped before its first epoch was saved, so there is "
                    "nothing to continue; start it again with the same command (it replaces a run without checkpoints)"
                )
            raise CnnlabError(f"{self.path} has no checkpoints/last.pt: it is not a cnnlab run directory that can be resumed")
        problems = []
        for candidate in (last, previous):
            if not candidate.is_file():
                problems.append(f"{candidate.name} is missing")
                continue
            try:
                checkpoint = load_checkpoint(candidate)
            except CnnlabError as exc:
                problems.append(str(exc))
                continue
            if candidate == previous:
                warnings.warn(f"{problems[0]}; resuming from {previous.name} (epoch {checkpoint.epoch}) instead")
                copy_checkpoint(previous, last)
            return checkpoint
        raise CnnlabError(f"{self.path} has no usable checkpoint to resume from: {'; '.join(problems)}")

    def has_checkpoints(self) -> bool:
        """Whether there is a checkpoint to resume from. A best.pt alone (a run killed between its first
        best.pt and last.pt) is not one: the run restarts, as if stopped before its first checkpoint."""
        return any((self.checkpoints / name).is_file() for name in ("last.pt", "last.prev.pt"))

    def is_finished(self) -> bool:
        """Whether the run got as far as testing its model (summary.json is written last)."""
        return (self.path / "summary.json").is_file()

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, rows: list[dict[str, float]]) -> None:
        buffer = io.StringIO()
        columns = METRIC_COLUMNS + tuple(k for k in OPTIONAL_COLUMNS if rows and k in rows[0])
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format_number(row[k]) for k in columns})
        atomic_write_text(self.path / "metrics.csv", buffer.getvalue())

    def read_metrics(self) -> list[dict[str, float]]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def save_checkpoint(self, kind: str, checkpoint: Checkpoint) -> Path:
        """Write checkpoints/KIND.pt; the "last" one it replaces stays as last.prev.pt, for --resume to fall back to."""
        path = self.checkpoints / f"{kind}.pt"
        if kind == "last" and path.is_file():
            copy_checkpoint(path, self.checkpoints / "last.prev.pt")
        save_checkpoint(path, checkpoint)
        return path

    def load_checkpoint(self, kind: str) -> Checkpoint:
        return load_checkpoint(self.checkpoints / f"{kind}.pt")

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def file(self, name: str) -> Path:
        return self.path / name


def _holds_a_stopped_run_without_checkpoints(path: Path) -> bool:
    """An empty folder, or a cnnlab run (config.yaml) that was stopped before saving any checkpoint."""
    if not path.is_dir():
        return False
    run = RunDirectory(path)
    # A temp file alone is a run killed while writing its first config.yaml.
    kept = [p for p in path.iterdir() if not is_temp_file(p.name)]
    return not run.has_checkpoints() and ((path / "config.yaml").is_file() or not kept)


def code_version() -> str | None:
    """The git commit of the cnnlab source, when it runs from a checkout."""
    source = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _format_number(value: float) -> str:
    # repr, the shortest text that reads back as the same float: a resumed run picks its best
    # epoch by comparing new accuracies with these, and 139/144 written as 0.965278 would make
    # a later tie lose (the straight run keeps the later epoch; the resumed one did not).
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))
