"""The run directory: the one place a training run writes its files.

runs/<name>/
  config.yaml             the resolved configuration (usable again with --config)
  metrics.csv             one row per epoch
  checkpoints/last.pt     after every epoch; what --resume continues from
  checkpoints/best.pt     the epoch with the best validation accuracy
  curves.png              loss and accuracy per epoch
  confusion_matrix.png / .csv   on the test split
  summary.json            test metrics, per-class report, versions

Every file is written atomically, so a run killed at any moment keeps the
previous version of each file.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cnnlab.atomicfile import atomic_write_text
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "images_per_s",
)  # fmt: skip


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._fresh = False

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDirectory:
        """A new run at `path`; checked now, made on disk only by `prepare()`.

        Deferring the folder until the data and model have loaded means a run
        that fails on bad input leaves nothing behind, and an --overwrite run
        that fails early keeps the run it would have replaced.
        """
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise CnnlabError(
                    f"run directory {path} already exists: choose another --name, pass --overwrite, "
                    f"or continue it with --resume {path}"
                )
            if not (path / "config.yaml").is_file() and any(path.iterdir()):
                raise CnnlabError(f"{path} exists and is not a cnnlab run directory; --overwrite only replaces runs")
        run = cls(path)
        run._fresh = True
        return run

    def prepare(self) -> None:
        """Make a new run's folder, replacing an old run there; nothing to do for a resumed run."""
        if not self._fresh:
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self._fresh = False

    @classmethod
    def open(cls, path: Path) -> RunDirectory:
        run = cls(path)
        if not (run.checkpoints / "last.pt").is_file():
            raise CnnlabError(f"{path} has no checkpoints/last.pt: it is not a cnnlab run directory that can be resumed")
        return run

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, rows: list[dict[str, float]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format_number(row[k]) for k in METRIC_COLUMNS})
        atomic_write_text(self.path / "metrics.csv", buffer.getvalue())

    def read_metrics(self) -> list[dict[str, float]]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def save_checkpoint(self, kind: str, checkpoint: Checkpoint) -> Path:
        path = self.checkpoints / f"{kind}.pt"
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
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"
