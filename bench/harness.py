"""What every benchmark under bench/ shares: data, timing, turns and reporting, written once.

A benchmark script keeps only what is its own (its contenders or kernels, its
table); it gets from here:

    data       `bench_splits` (a dataset cut to a subset, the same for every
               contender), `default_dataset`, `train_batches` (normalized
               batches prepared before any clock starts)
    options    `bench_parser` (--dataset, --quick, --out, --docs) and
               `contender_parser` (what bench/run.py passes to a contender)
    timing     `alternate`: seconds per call of several pieces of work, taking
               turns round after round in alternating order, so that a busy
               neighbour slows all of them alike; `calls_for`; `one_thread`
    turns      `Turns` and `run_in_turns`: contenders in processes of their
               own, one at a time, epoch by epoch (see Turns)
    contenders `Clock`, `Record`, `steady_images_per_s`, `test_accuracy`
    reporting  `results_path`, `write_results` (the figures, with machine,
               versions, command and date), `write_docs` (a generated section
               of a Markdown file)

A contender of bench/run.py is a training recipe run in its own process (so
that its peak memory is its own). It trains on the bench's data, and after
every epoch it stops its clock, tests the model, and starts the clock again:

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import cnnlab
from cnnlab.atomicfile import atomic_write_text
from cnnlab.data.dataset import DatasetSplits, ImageDataset, Normalization
from cnnlab.data.sources import DatasetSource, get_source, load_splits, register_source
from cnnlab.train.rundir import code_version

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
TARGET_ACCURACY = 0.90
VAL_FRACTION = 0.1  # cnnlab's default; every contender trains on the same train split


# Data


def default_dataset() -> str:
    """Fashion-MNIST where it is installed, the built-in digits otherwise."""
    return "fashion-mnist" if get_source("fashion-mnist").find(None) is not None else "digits"


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

    name = f"bench-{dataset}"
    register_source(DatasetSource(name, f"{dataset}, as the bench uses it", (), read))
    return name


def bench_splits(dataset: str, train_limit: int | None, test_limit: int | None, seed: int) -> DatasetSplits:
    name = register_bench_source(dataset, train_limit, test_limit)
    return load_splits(name, None, VAL_FRACTION, seed)


def _first(data: ImageDataset, limit: int | None) -> ImageDataset:
    if limit is None or limit >= len(data):
        return data
    return data.subset(torch.arange(limit))


def train_batches(
    data: ImageDataset, normalization: Normalization, batch_size: int, steps: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` shuffled batches, gathered and normalized as the training loop does, before any clock starts.

    Each is (x (B, C, H, W) float32 normalized, y (B,) int64); past the data's end they wrap around.
    """
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    order = order.repeat(-(-steps * batch_size // len(order)))
    batches = []
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        batches.append((normalization.apply(data.images, index), data.labels[index]))
    return batches


# Options


def bench_parser(description: str, dataset: bool = True) -> argparse.ArgumentParser:
    """The options every stand-alone benchmark takes (--dataset where it trains on one); a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few short repeats: checks the script runs, "
                        "figures not meaningful")  # fmt: skip
    if dataset:
        parser.add_argument("--dataset", help="default: fashion-mnist where it is installed, else the built-in digits")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<script>.json; with --quick, "
                        "in the temporary folder)")  # fmt: skip
    return parser


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


# Timing


def alternate(
    work: dict[str, Callable[[], object]], rounds: int, calls: int | dict[str, int] = 1
) -> dict[str, list[float]]:
    """Seconds per call of each piece of `work`, one figure per round, the pieces taking turns.

    Each round runs every piece `calls` times in a row (a number, or one per name), in
    the given order on even rounds and reversed on odd ones, so that neither always
    follows the other; a shared host's drift then falls on all of them alike. One
    untimed call of each first: allocations, compilation, kernel selection.
    """
    per_name = calls if isinstance(calls, dict) else dict.fromkeys(work, calls)
    for run in work.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in work}
    names = list(work)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else reversed(names):
            run, count = work[name], per_name[name]
            started = time.perf_counter()
            for _ in range(count):
                run()
            seconds[name].append((time.perf_counter() - started) / count)
    return seconds


def calls_for(work: dict[str, Callable[[], object]], seconds: float) -> dict[str, int]:
    """How many calls of each piece of `work` take about `seconds` (from one timed call, after a warm-up)."""
    counts = {}
    for name, run in work.items():
        run()
        started = time.perf_counter()
        run()
        counts[name] = max(1, int(seconds / max(time.perf_counter() - started, 1e-6)))
    return counts


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (what each slice of a sliced step runs on); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Turns between processes


class Turns:
    """One contender trains at a time: epoch-by-epoch turns handed out by `run_in_turns`.

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


def run_in_turns(jobs: dict[str, tuple[str, list[str], Path]]) -> dict[str, dict]:
    """Run bench scripts (script, arguments, results path) at once, one turn at a time each; their results by key.

    Each gets two pipes (Turns): it writes a byte to DONE when it is ready and
    after every turn, and waits for a byte on GO to start the next. A script
    that exits (finished, or failed) closes DONE and leaves the rotation.
    """
    running = {}
    for key, (script, arguments, out) in jobs.items():
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        command = [sys.executable, str(BENCH / script), "--out", str(out), "--turn-fds", f"{go_read},{done_write}"]
        # stderr passes through: the contenders print one line per epoch, and only one trains at a time.
        process = subprocess.Popen([*command, *arguments], cwd=ROOT, pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)
        running[key] = (process, go_write, done_read)
    # Everyone ready (data loaded, model built) before the first turn, so no one's loading overlaps a turn.
    rotation = [key for key, (_, _, done) in running.items() if os.read(done, 1)]
    while rotation:
        for key in list(rotation):
            _, go, done = running[key]
            try:
                os.write(go, b".")
                ended = bool(os.read(done, 1))
            except BrokenPipeError:
                ended = False
            if not ended:
                rotation.remove(key)
    results = {}
    for key, (process, go, done) in running.items():
        os.close(go)
        os.close(done)
        status = process.wait()
        script, _, out = jobs[key]
        failed = {"error": f"{script} exited with status {status}"}
        results[key] = json.loads(out.read_text()) if status == 0 else failed
    return results


# Contenders


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
        write_json(path, self.to_dict())


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


# Reporting


def machine() -> dict:
    """The CPU, the threads torch uses and the versions the figures were taken with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cnnlab": cnnlab.__version__,
        "git_commit": code_version(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def results_path(name: str, quick: bool, out: Path | None = None) -> Path:
    """Where a script's results go: `out` if given, else bench/results/<name>.json; a quick run's
    figures mean nothing, so they go to the temporary folder instead, leaving the real ones alone."""
    if out is not None:
        return out
    return Path(tempfile.gettempdir()) / f"cnnlab-bench-{name}.json" if quick else RESULTS / f"{name}.json"


def write_json(path: Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def write_results(path: Path, figures: dict, started: float | None = None) -> dict:
    """`figures` as JSON at `path`, with what they were measured on, the command and the date
    (`started`, a time.time(); default now); returns what was written."""
    results = {
        **figures,
        "machine": machine(),
        "load_average": figures.get("load_average") or load_average(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.fromtimestamp(started or time.time(), timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(path, results)
    print(f"results written to {path}")
    return results


def write_docs(path: Path, table: str, begin: str, end: str) -> None:
    """Replace the generated section of `path` (between the `begin` and `end` lines), keeping the hand-written
    text; where the markers are not there yet, the section is added at the end of the file."""
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(path, f"{head}{begin}\n{table}\n{end}{tail}")
    print(f"table written into {path}")


def docs_table_bench(
    argv: list[str] | None,
    *,
    description: str,
    name: str,
    measure: Callable[[str, int, int], dict],
    markdown: Callable[[dict], str],
    sizes: tuple[tuple[int, int], tuple[int, int]],
    docs: Path,
    markers: tuple[str, str],
) -> dict:
    """The main of a benchmark whose Markdown table lives in a docs page: parse the common options and --docs,
    measure(dataset, steps, rounds) with sizes' (steps, rounds) for --quick and for a real run, write the results
    JSON, print the table, and write it between the docs page's `markers` (not with --quick unless --docs is
    given). Returns the results written."""
    parser = bench_parser(description)
    parser.add_argument("--docs", type=Path, help=f"Markdown file for the table (default {docs.relative_to(ROOT)}; "
                        "not written with --quick unless given)")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.time()
    steps, rounds = sizes[0] if args.quick else sizes[1]
    figures = measure(args.dataset or default_dataset(), steps, rounds)
    results = write_results(results_path(name, args.quick, args.out), {**figures, "quick": args.quick}, started)
    table = markdown(results)
    print(table)
    target = args.docs or (None if args.quick else docs)
    if target is not None:
        write_docs(target, table, *markers)
    return results

