"""What every contender of `bench/run.py` measures, and how.

A contender is a training recipe run in its own process (so that its peak
memory is its own). It trains on the bench's data, and after every epoch it
stops its clock, tests the model, and starts the clock again:

    elapsed        seconds of training so far, including whatever the recipe does
                   between epochs (cnnlab's validation and checkpoints), excluding
                   the bench's own test evaluations
    images_per_s   training images per second of the training loop alone; the
                   steady-state figure is the median over epochs, without the
                   first (warm-up) epoch when there are more (`steady_images_per_s`;
                   bench/run.py takes it again over the epochs all contenders ran)
    time_to_target the elapsed seconds at the end of the first epoch whose test
                   accuracy reaches the target (90%), or None: "not reached"

A budget caps every contender: it stops at the first epoch end (or, for the
per-batch recipes, the first batch) past the budget.

bench/run.py runs the contenders at the same time, taking turns epoch by
epoch (`Turns`), so that the host's drift falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab.data.dataset import DatasetSplits, ImageDataset
from cnnlab.data.sources import DatasetSource, get_source, load_splits, register_source

TARGET_ACCURACY = 0.90
VAL_FRACTION = 0.1  # cnnlab's default; every contender trains on the same train split


def contender_parser(description: str, epochs: int | None, epochs_help: str | None = None) -> argparse.ArgumentParser:
    """The options every contender script takes from bench/run.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training at most")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turn-fds", help="set by bench/run.py: the file descriptors 'GO,DONE' of its turn pipes")
    return parser


def bench_source_name(dataset: str) -> str:
    return f"bench-{dataset}"


def register_bench_source(dataset: str, train_limit: int | None, test_limit: int | None) -> str:
    """Register `dataset`, cut to its first `train_limit` / `test_limit` images, under a new name.

    cnnlab's `fit` reads its data by name, so this is how a subset reaches it:
    every contender loads the bench's data through this one source, which makes
    the train, validation and test images the same for all of them.
    """
    source = get_source(dataset)

    def read(_folder: Path | None) -> tuple[ImageDataset, ImageDataset]:
        train, test = source.load(None)
        return _first(train, train_limit), _first(test, test_limit)

    name = bench_source_name(dataset)
    register_source(DatasetSource(name, f"{dataset}, as the bench uses it", (), read))
    return name


def bench_splits(dataset: str, train_limit: int | None, test_limit: int | None, seed: int) -> DatasetSplits:
    name = register_bench_source(dataset, train_limit, test_limit)
    return load_splits(name, None, VAL_FRACTION, seed)


def _first(data: ImageDataset, limit: int | None) -> ImageDataset:
    if limit is None or limit >= len(data):
        return data
    return data.subset(torch.arange(limit))


@dataclass
class Clock:
    """Training time with the bench's test evaluations taken out, and a budget."""

    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.excluded

    def spent(self) -> bool:
        return self.elapsed() >= self.budget_s

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Time spent in the block does not count: the bench's tests, waiting for a turn."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - paused


class Turns:
    """One contender trains at a time: epoch-by-epoch turns handed out by bench/run.py.

    The host's speed drifts by 20-30% over minutes, so contenders timed one
    after another are timed on different machines. bench/run.py starts them
    together instead and lets one train at a time: a contender calls `take`
    before its first epoch (saying it is ready) and after each epoch's test (handing
    the turn on), outside its clock; `take` returns when its next turn comes.
    Two pipes carry the turns: the runner writes a byte to GO to start a turn,
    the contender one to DONE to end it. Run by hand (no --turn-fds), `take` returns at once.
    """

    def __init__(self, fds: str | None, log: list[list[float]]) -> None:
        self.go, self.done = (int(fd) for fd in fds.split(",")) if fds else (None, None)
        self.log = log  # appended to: wall-clock [start, end] of each turn, the current one [start]

    def take(self) -> None:
        if self.done is None:
            return
        if self.log:
            self.log[-1].append(round(time.time(), 4))
        os.write(self.done, b".")
        if not os.read(self.go, 1):
            raise SystemExit("bench: the runner that hands out the turns has gone")
        self.log.append([round(time.time(), 4)])


@dataclass
class Record:
    """One contender's results, written as JSON for `bench/run.py`."""

    name: str
    description: str
    batch_size: int
    train_images: int
    seed: int = 0
    epochs: list[dict] = field(default_factory=list)
    final_test_accuracy: float | None = None
    stopped_by_budget: bool = False
    notes: list[str] = field(default_factory=list)
    turns: list[list[float]] = field(default_factory=list)

    def add_epoch(self, epoch: float, elapsed: float, train_seconds: float, images: int, test_accuracy: float) -> None:
        self.epochs.append(
            {
                "epoch": epoch,
                "elapsed_s": round(elapsed, 3),
                "train_s": round(train_seconds, 3),
                "images_per_s": round(images / train_seconds, 1) if train_seconds > 0 else None,
                "test_accuracy": round(test_accuracy, 4),
            }
        )

    def to_dict(self) -> dict:
        reached = next((e for e in self.epochs if e["test_accuracy"] >= TARGET_ACCURACY), None)
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "train_images": self.train_images,
            "images_per_s": steady_images_per_s(self.epochs),
            "time_to_target_s": reached["elapsed_s"] if reached else None,
            "epochs_to_target": reached["epoch"] if reached else None,
            "target_accuracy": TARGET_ACCURACY,
            "final_test_accuracy": self.final_test_accuracy,
            "stopped_by_budget": self.stopped_by_budget,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "torch_threads": torch.get_num_threads(),
            "epochs": self.epochs,
            "notes": self.notes,
            "turns": self.turns,
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def steady_images_per_s(epochs: list[dict], last: int | None = None) -> float | None:
    """The steady-state training speed: the median images/s of `epochs[:last]`, the first (warm-up) left out if more."""
    rates = [e["images_per_s"] for e in epochs[:last] if e["images_per_s"]]
    steady = rates[1:] if len(rates) > 1 else rates
    return round(statistics.median(steady), 1) if steady else None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@torch.no_grad()
def test_accuracy(forward, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Accuracy of `forward` on already-preprocessed (N, C, H, W) float32 images."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = forward(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def training_flops_per_image(model: nn.Module, in_shape: tuple[int, int, int]) -> float:
    """Floating-point operations to train on one image: 3 x the forward pass's 2 x multiply-adds.

    Counts Conv2d and Linear layers only (pooling, ReLU and the loss are a
    fraction of a percent). The factor 3 (forward, input gradient, weight
    gradient) slightly overcounts the first conv, whose input needs no gradient.
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return 3 * 2 * macs


def matmul_gflops(size: int = 1024, repeats: int = 20) -> dict:
    """float32 matrix multiply speed on this CPU, with the threads torch uses: best and median of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    flops = 2 * size**3
    return {
        "size": size,
        "best_gflops": round(flops / min(seconds) / 1e9, 1),
        "median_gflops": round(flops / statistics.median(seconds) / 1e9, 1),
    }
