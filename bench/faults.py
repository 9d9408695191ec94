"""Fault injection: SIGKILL `cnnlab train` at seeded random moments, resume each time, compare with a straight run.

    python bench/faults.py --kills 100          # the full size (about 10 minutes on 2 CPU cores)
    python bench/faults.py --kills 5 --epochs 8 # what tests/reliability/test_kill.py runs

A straight run of the same command first gives the weights to match and the timings
that place the kills. Then the same command runs again, and is killed N times, each
kill one of four kinds, drawn from the seed:

    startup  a random moment before training starts (data loading, the run folder, config.yaml)
    epoch    right after an epoch's line is printed (the epoch nearest a planned moment): its
             checkpoints and metrics are written, the next epoch has begun
    timed    a moment spread evenly over the training phase (epochs, checkpoint saves,
             the final test and plots): N moments drawn over it, taken in order
    save     the moment a temporary file (`.NAME.XXXXXXXX.tmp`, what an atomic write
             makes) shows up in the run or its checkpoints folder: a kill inside a save

After each kill it does what the README says: `--resume RUN` when the run holds a
checkpoint, else the same command again (a folder without checkpoints is replaced
by a new run of the same name). After every kill, every file in checkpoints/
(temporary ones too) must load with `load_checkpoint` or be refused with a
CnnlabError, and the named checkpoints must load. Once the last resume finishes:
no temporary file left in the run, metrics.csv has epochs 1..E once each, and
best.pt and last.pt hold bit-identical weights to the straight run's. A run that
finishes before all N kills have landed is trained again from scratch and killed by
the rest (`trainings` counts them); the last one is the one compared.

A run that can neither be resumed nor restarted is a problem (`stuck`); the
harness then does what a user would, deletes it and starts again, so that the
remaining figures still mean something. `FaultReport.problems()` lists every check that failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("startup", "epoch", "timed", "save")
WEIGHTS = {"startup": 0.1, "epoch": 0.15, "timed": 0.45, "save": 0.3}  # the share of each kind of kill


@dataclass
class Timings:
    """From the straight run: seconds from start to the "training ..." line, per epoch, and from the last epoch to exit."""

    startup: float
    epoch: float
    finish: float


@dataclass
class FaultReport:
    epochs: int
    kills: int = 0
    kills_by_kind: dict[str, int] = field(default_factory=dict)
    kills_during_save: int = 0  # a temporary file or a two-digest sidecar was left: the kill cut a save
    resumes: int = 0
    reruns: int = 0  # the same command again, after a kill before the first checkpoint
    # Trainings from scratch: a run that finishes before every kill has landed (the plan's late
    # moments fall after it) is trained again, killed by the rest; the last one is compared. At most 20.
    trainings: int = 1
    checkpoint_loads: int = 0  # load_checkpoint calls on files left after kills
    refused_temp_files: int = 0  # partial temporary files refused with a CnnlabError, as they should be
    unloadable: list[str] = field(default_factory=list)  # named checkpoints (NAME.pt) that did not load
    crashes: list[str] = field(default_factory=list)  # load_checkpoint raising anything but CnnlabError
    stuck: list[str] = field(default_factory=list)  # a resume or rerun that failed
    leftover_temp_files: list[str] = field(default_factory=list)
    metrics_epochs: list[int] = field(default_factory=list)
    identical: dict[str, bool] = field(default_factory=dict)  # best.pt, last.pt against the straight run
    seconds: float = 0.0

    def problems(self) -> list[str]:
        found = [f"unloadable: {p}" for p in self.unloadable] + [f"crash: {c}" for c in self.crashes]
        found += [f"stuck: {s}" for s in self.stuck] + [f"left over: {t}" for t in self.leftover_temp_files]
        found += [f"{name} differs from the straight run" for name, same in self.identical.items() if not same]
        if self.metrics_epochs != list(range(1, self.epochs + 1)):
            found.append(f"metrics.csv holds epochs {self.metrics_epochs}, not 1..{self.epochs}")
        return found


def train_command(runs: Path, name: str, epochs: int, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "cnnlab", "train", "--dataset", "digits", "--epochs", str(epochs),
        "--batch-size", "64", "--seed", str(seed), "--runs-dir", str(runs), "--name", name,
    ]  # fmt: skip


class Training:
    """One `cnnlab train` process, with the moment its "training ..." line appeared."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        self.training_at: float | None = None
        self.epoch_lines: list[float] = []
        self.output: list[str] = []
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("training "):
                self.training_at = time.monotonic()
            elif line.startswith("epoch "):
                self.epoch_lines.append(time.monotonic())

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        status = self.process.wait()
        self._reader.join()
        return status

    def kill(self) -> bool:
        """SIGKILL; False when the process had already ended."""
        if not self.running():
            return False
        self.process.send_signal(signal.SIGKILL)
        return self.wait() == -signal.SIGKILL

    def tail(self) -> str:
        return "".join(self.output[-5:]).strip()


def straight_run(runs: Path, epochs: int, seed: int) -> Timings:
    training = Training(train_command(runs, "straight", epochs, seed))
    status = training.wait()
    if status != 0 or training.training_at is None or len(training.epoch_lines) != epochs:
        raise RuntimeError(f"the straight run failed ({status}): {training.tail()}")
    ended = time.monotonic()
    last_epoch = training.epoch_lines[-1]
    return Timings(
        startup=training.training_at - training.started,
        epoch=(last_epoch - training.training_at) / epochs,
        finish=ended - last_epoch,
    )


def temp_files(run: Path) -> list[Path]:
    return sorted(run.rglob("*.tmp")) if run.is_dir() else []


def wait_for_temp_file(training: Training, run: Path, count: int, timeout: float, old: set[str]) -> None:
    """Return once `count` new temporary files (not in `old`) have been seen in `run` or its checkpoints, or the process ended."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    folders = (run, run / "checkpoints")
    while training.running() and time.monotonic() < deadline:
        for folder in folders:
            try:
                with os.scandir(folder) as entries:
                    seen.update(e.name for e in entries if e.name.endswith(".tmp") and e.name not in old)
            except OSError:
                pass  # not made yet
        if len(seen) >= count:
            return
        os.sched_yield()


def saved_epoch(run: Path) -> int:
    """The epoch of the run's last.pt, 0 without one (read as --resume would, but without cleaning up)."""
    from cnnlab.errors import CnnlabError
    from cnnlab.train.checkpoint import load_checkpoint

    for name in ("last.pt", "last.prev.pt"):
        try:
            return load_checkpoint(run / "checkpoints" / name).epoch
        except CnnlabError:
            continue
    return 0


def leftovers(run: Path) -> set[str]:
    """What a kill inside a save leaves: temporary files, and sidecars still listing an old digest beside the new one."""
    sidecars = [s for s in run.glob("checkpoints/*.sha256") if len(s.read_text().splitlines()) > 1] if run.is_dir() else []
    return {str(p) for p in temp_files(run)} | {f"{s}:{s.read_text()}" for s in sidecars}


def describe(run: Path) -> str:
    """What a kill left: the epochs of last.pt and best.pt, metrics.csv's last epoch, the temporary files."""
    from cnnlab.errors import CnnlabError
    from cnnlab.train.checkpoint import load_checkpoint

    epochs = {}
    for name in ("last.pt", "best.pt"):
        try:
            epochs[name] = load_checkpoint(run / "checkpoints" / name).epoch
        except CnnlabError:
            epochs[name] = None
    metrics = run / "metrics.csv"
    rows = len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0
    temps = [str(p.relative_to(run)) for p in temp_files(run)]
    return f"last.pt epoch {epochs['last.pt']}, best.pt epoch {epochs['best.pt']}, metrics rows {rows}, temp files {temps}"


def check_checkpoints(run: Path, report: FaultReport, kill: int) -> None:
    """Every file in checkpoints/ loads or is refused with a CnnlabError; NAME.pt files load."""
    from cnnlab.errors import CnnlabError
    from cnnlab.train.checkpoint import load_checkpoint

    folder = run / "checkpoints"
    # NAME.pt, and .NAME.pt.XXXXXXXX.tmp: a checkpoint cut mid-write (not the sidecars' temporary files).
    files = [p for p in folder.iterdir() if p.name.endswith(".pt") or ".pt." in p.name and p.name.endswith(".tmp")
             and ".sha256." not in p.name] if folder.is_dir() else []  # fmt: skip
    for path in files:
        report.checkpoint_loads += 1
        try:
            load_checkpoint(path)
        except CnnlabError as exc:
            if path.name.endswith(".tmp"):
                report.refused_temp_files += 1
            else:
                report.unloadable.append(f"after kill {kill}: {path.name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other type is what this looks for
            report.crashes.append(f"after kill {kill}: {path.name}: {type(exc).__name__}: {exc}")


def next_command(runs: Path, name: str, epochs: int, seed: int, report: FaultReport) -> list[str]:
    """--resume when the run holds a checkpoint; otherwise the same command again (README: it replaces such a run)."""
    run = runs / name
    if run.is_dir() and any((run / "checkpoints").glob("*.pt")):
        report.resumes += 1
        return [sys.executable, "-m", "cnnlab", "train", "--resume", str(run)]
    report.reruns += 1
    return train_command(runs, name, epochs, seed)


def again(report: FaultReport, kills: int, run: Path) -> bool:
    """Whether a finished run is trained again from scratch, for the kills still to land (at most 20 times)."""
    if report.kills >= kills or report.trainings >= 20:
        return False
    report.trainings += 1
    shutil.rmtree(run)
    return True


def kill_at_random(
    training: Training,
    run: Path,
    kind: str,
    rng: random.Random,
    timings: Timings,
    *,
    planned: float,
    span: float,
    resumed_from: int,
    epochs: int,
) -> bool:
    """Kill `training` at a moment of `kind`; False when it ended first.

    `planned` is a moment of the straight run's training phase, which lasts `span` seconds.
    """
    if kind == "startup":
        # At a random moment, or at the latest as the "training ..." line shows, before the first step.
        deadline = time.monotonic() + rng.uniform(0, timings.startup)
        while time.monotonic() < deadline and training.training_at is None and training.running():
            time.sleep(0.0005)
    elif kind == "epoch":
        # After the epoch the plan's moment falls in (scaled to the epochs), so that epoch kills move
        # through the run as the timed ones do.
        target = math.ceil(planned / span * epochs)
        lines = min(max(1, target - resumed_from), epochs - resumed_from)
        while len(training.epoch_lines) < lines and training.running():
            time.sleep(0.0005)
    elif kind == "save":
        old = {p.name for p in temp_files(run)}  # a killed run's, until --resume clears them
        wait_for_temp_file(training, run, count=rng.randint(1, 3), timeout=timings.startup + 60, old=old)
    else:
        while training.training_at is None and training.running():
            time.sleep(0.001)
        if training.training_at is not None:
            # `planned` is a point of the straight run's training phase; this process starts that phase
            # at the epoch it resumed from, so the kill lands where the plan puts it (short of this
            # process's end), or early in its first epoch when it started past that point.
            remaining = (epochs - resumed_from) * timings.epoch + timings.finish
            offset = planned - resumed_from * timings.epoch
            offset = min(offset, 0.8 * remaining) if offset > 0 else rng.uniform(0, timings.epoch)
            time.sleep(max(0.0, training.training_at + offset - time.monotonic()))
    return training.kill()


def run_with_faults(
    workdir: Path, *, kills: int, epochs: int, seed: int = 0, kinds: tuple[str, ...] = KINDS, log=None
) -> FaultReport:
    """Train digits for `epochs` epochs, killed `kills` times (seeded) at moments of `kinds`, and check the
    run against a straight one."""
    from cnnlab.errors import CnnlabError
    from cnnlab.train.checkpoint import load_checkpoint

    started = time.monotonic()
    runs, name = Path(workdir), "killed"
    run = runs / name
    timings = straight_run(runs, epochs, seed)
    rng = random.Random(seed)
    span = epochs * timings.epoch + timings.finish
    plan = sorted(rng.uniform(0, span) for _ in range(kills))  # the timed kills' moments, spread over the phase
    report = FaultReport(epochs)
    command = train_command(runs, name, epochs, seed)
    while True:
        resumed_from, before = saved_epoch(run), leftovers(run)
        training = Training(command)
        if report.kills < kills:
            kind = rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
            if kind in ("save", "epoch") and resumed_from >= epochs:
                kind = "timed" if "timed" in kinds else "startup"  # every save is done: the test and summary remain
            if kill_at_random(
                training, run, kind, rng, timings,
                planned=plan[report.kills], span=span, resumed_from=resumed_from, epochs=epochs,
            ):
                report.kills += 1
                report.kills_by_kind[kind] = report.kills_by_kind.get(kind, 0) + 1
                report.kills_during_save += bool(leftovers(run) - before)
                check_checkpoints(run, report, report.kills)
                if log:
                    log(f"kill {report.kills:3d} ({kind:7s}) {describe(run)}")
                if (run / "summary.json").is_file():  # killed after its last write: only the exit status was lost
                    if not again(report, kills, run):
                        break
                    command = train_command(runs, name, epochs, seed)
                    continue
                command = next_command(runs, name, epochs, seed, report)
                continue
        status = training.wait()
        if status == 0:
            if not again(report, kills, run):
                break
            command = train_command(runs, name, epochs, seed)
            continue
        report.stuck.append(f"after kill {report.kills}: {' '.join(command[3:])} exited {status}: {training.tail()}")
        if len(report.stuck) > 10:
            break
        # What a user would do next: delete the run and start it again.
        shutil.rmtree(run, ignore_errors=True)
        command = train_command(runs, name, epochs, seed)
    report.leftover_temp_files = [str(p.relative_to(run)) for p in temp_files(run)]
    metrics = run / "metrics.csv"
    report.metrics_epochs = [int(r["epoch"]) for r in csv.DictReader(open(metrics))] if metrics.is_file() else []
    for checkpoint in ("best.pt", "last.pt"):
        straight = load_checkpoint(runs / "straight" / "checkpoints" / checkpoint).model_state
        try:
            killed = load_checkpoint(run / "checkpoints" / checkpoint).model_state
        except CnnlabError:
            report.identical[checkpoint] = False
            continue
        report.identical[checkpoint] = straight.keys() == killed.keys() and all(
            straight[k].dtype == killed[k].dtype and straight[k].shape == killed[k].shape
            and straight[k].numpy().tobytes() == killed[k].numpy().tobytes()
            for k in straight
        )  # fmt: skip
    report.seconds = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"the kinds of kill, comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cnnlab-faults-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kinds = tuple(args.kinds.split(","))
        report = run_with_faults(workdir, kills=args.kills, epochs=args.epochs, seed=args.seed, kinds=kinds, log=print)
    figures = {"command": " ".join(sys.argv), **asdict(report), "problems": report.problems()}
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("unloadable", "crashes")}, indent=2))
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
