"""`cnnlab tune`: hyper-parameter search on Optuna, chosen on validation accuracy only.

Each trial is a cnnlab run, RUNS/STUDY/trial-NNNN, trained with `fit(test=False)`:
the test split is withheld from it, and after every epoch its validation accuracy
is reported to Optuna, whose pruner may stop it there. A trial's value is its best
validation accuracy (the epoch its best.pt holds). When the search ends, the best
trial alone is tested (its run gets summary.json like any run), and its config is
written to RUNS/STUDY/best.yaml, which `cnnlab train --config` takes.

The study lives in Optuna storage: by default RUNS/STUDY/study.db (SQLite), so the
same command run again continues it up to --trials finished trials; any Optuna
storage URL (postgresql://, mysql://) lets processes on several machines share one
study. --jobs K runs K worker processes on this machine, sharing the study the same
way. A killed tune loses only the trials that were running: with heartbeats, the
next run marks them failed and does not count them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cnnlab.atomicfile import atomic_write_text
from cnnlab.config import TrainConfig, load_yaml_config, resolve_config
from cnnlab.data.sources import load_splits
from cnnlab.errors import CnnlabError
from cnnlab.tools.space import Param, check_space, nested
from cnnlab.train.loop import Interrupted, finish, fit, state_at, stop_record
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
EXIT_INTERRUPTED = 130  # a worker stopped by a signal
HEARTBEAT_S = 30  # a trial whose process stopped beating for 4x this is marked failed on the next start


@dataclass(frozen=True)
class TuneSettings:
    """How to search. fixed: the train options every trial shares, as config layers (a file's, then the flags')."""

    fixed: tuple[dict[str, Any], ...]
    space: tuple[Param, ...]
    trials: int  # finished (complete or pruned) trials the study should hold
    sampler: str = "tpe"
    pruner: str = "median"
    study: str | None = None  # default: MODEL-DATASET
    storage: str | None = None  # default: sqlite:///RUNS/STUDY/study.db
    jobs: int = 1
    timeout: float | None = None  # seconds for the search, per worker
    recipe: bool = True  # start from cnnlab's tuned recipe, as `cnnlab train` does

    def validate(self) -> TrainConfig:
        """Refuse bad settings before any trial starts; the config the fixed options make."""
        if self.sampler not in SAMPLERS:
            raise CnnlabError(f"unknown sampler '{self.sampler}': choose one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise CnnlabError(f"unknown pruner '{self.pruner}': choose one of {', '.join(PRUNERS)}")
        if self.trials < 1 or self.jobs < 1:
            raise CnnlabError(f"--trials and --jobs must be at least 1, got {self.trials} and {self.jobs}")
        if self.timeout is not None and not self.timeout > 0:
            raise CnnlabError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if any("name" in layer for layer in self.fixed):
            raise CnnlabError("--name cannot be fixed: tune names each trial's run itself (use --study)")
        config = resolve_config(*self.fixed, origin="tune options", recipe=self.recipe)
        if config.val_fraction == 0 and not config.dataset.startswith("folder:"):
            raise CnnlabError("tune chooses on validation accuracy: --val-fraction must be above 0")
        check_space(list(self.space), self.fixed, origin="the search space", recipe=self.recipe)
        return config

    def study_name(self, config: TrainConfig) -> str:
        return self.study or f"{config.model}-{config.dataset}".replace("/", "_").replace(":", "_")


@dataclass(frozen=True)
class TuneResult:
    study_dir: Path
    best_config: Path  # best.yaml
    summary: dict[str, Any]  # also in RUNS/STUDY/tune.json


def tune(settings: TuneSettings, progress: Progress) -> TuneResult:
    """Run the search (continuing a stored study), test its best trial, write best.yaml, plots and tune.json."""
    import optuna

    base = settings.validate()
    name = settings.study_name(base)
    study_dir = Path(base.runs_dir) / name
    storage_url = settings.storage or f"sqlite:///{study_dir / 'study.db'}"
    _check_writable(storage_url, study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=open_storage(storage_url), direction="maximize", load_if_exists=True
    )
    already = _finished(study)
    progress.message(f"study {name} in {storage_url}: {already} of {settings.trials} trials finished")
    started = time.perf_counter()
    if already < settings.trials:
        try:
            if settings.jobs == 1:
                _search(settings, name, storage_url, study_dir, worker=0, progress=progress)
            else:
                _search_in_processes(settings, name, storage_url, study_dir, to_stderr=progress.stream is sys.stderr)
        except KeyboardInterrupt as exc:  # the trial's own advice (resume its run) does not apply to a study
            signum = getattr(exc, "exit_status", 128 + signal.SIGINT) - 128
            raise Interrupted(signum, f"interrupted; study {name} keeps its finished trials: run the same command "
                              "again to continue it") from None  # fmt: skip
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    summary = _summarize(study, settings, wall)
    if summary["best"] is None:
        raise CnnlabError(f"no trial of study {name} finished: see the trial runs in {study_dir}")
    best_run = RunDirectory(Path(summary["best"]["run_dir"]))
    if not best_run.file("config.yaml").is_file():  # a study shared by several machines: the run is elsewhere
        raise CnnlabError(f"the best trial's run {best_run.path} is not on this machine: run this command on the "
                          "machine that holds it to test it and write best.yaml")  # fmt: skip
    config = resolve_config(load_yaml_config(best_run.file("config.yaml")), origin=str(best_run.path), recipe=False)
    summary["best"]["test_accuracy"] = final_test(best_run, config)
    best_yaml = study_dir / "best.yaml"
    atomic_write_text(best_yaml, yaml.safe_dump({**config.to_dict(), "name": None}, sort_keys=False))
    write_plots(study, study_dir)
    atomic_write_text(study_dir / "tune.json", _json(summary))
    return TuneResult(study_dir, best_yaml, summary)


def open_storage(url: str):
    """Optuna's RDB storage at `url`, with heartbeats; CnnlabError when it cannot be opened."""
    import optuna

    # SQLite serializes writers: several workers wait for the lock rather than fail at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):  # workers starting together may race to create the tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are marked so
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=4 * HEARTBEAT_S
                )
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy and the drivers fail in many ways
            if attempt == 2:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise CnnlabError(f"cannot open the study storage {url} ({reason}): pass a --storage that can be written") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _check_writable(url: str, study_dir: Path) -> None:
    """Trial runs go under `study_dir`, and a SQLite file beside them: both must be writable."""
    folders = [study_dir]
    if url.startswith("sqlite:///"):
        folders.append(Path(url[len("sqlite:///") :]).parent)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnlabError(f"cannot create {folder} for the study ({exc.strerror}): pass a --storage or --runs-dir that can be written") from None
        if not os.access(folder, os.W_OK):
            raise CnnlabError(f"{folder} cannot be written: pass a --storage or --runs-dir that can be written")


def _search(settings: TuneSettings, name: str, storage_url: str, study_dir: Path, worker: int, progress: Progress) -> None:
    """One worker: run trials until the study holds `settings.trials` finished ones, or the timeout."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cnnlab prints its own line per trial
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url), pruner=_pruner(settings.pruner))
    # Seeded by worker and by the study's size, so that workers, and a search continued, draw afresh.
    study.sampler = _sampler(settings, seed=worker + 1000 * len(study.trials))

    def objective(trial: optuna.Trial) -> float:
        sampled = {param.name: param.suggest(trial) for param in settings.space}
        run_name = f"trial-{trial.number:04d}"
        config = resolve_config(*settings.fixed, nested(sampled), {"name": run_name, "runs_dir": str(study_dir)},
                                origin=f"trial {trial.number}", recipe=settings.recipe)  # fmt: skip
        run = RunDirectory.create(study_dir / run_name, overwrite=True)
        trial.set_user_attr("run_dir", str(run.path))
        progress.message(f"trial {trial.number}: " + ", ".join(f"{k}={_short(v)}" for k, v in sampled.items()))

        def report(row: dict[str, float]) -> None:
            epoch = int(row["epoch"])
            trial.report(row["val_accuracy"], epoch)
            trial.set_user_attr("epochs", epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {row['val_accuracy']:.4f} at epoch {epoch}")

        result = fit(config, run, Progress(stream=progress.stream, bar=False, quiet=True), on_epoch=report, test=False)
        value = max(row["val_accuracy"] for row in result.rows)
        progress.message(f"trial {trial.number}: best validation accuracy {100 * value:.2f}%")
        return value

    remaining = settings.trials - _finished(study)
    if remaining <= 0:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(
            objective, n_trials=remaining, timeout=settings.timeout, gc_after_trial=False,
            callbacks=[MaxTrialsCallback(settings.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
        )  # fmt: skip


def _search_in_processes(settings: TuneSettings, name: str, storage_url: str, study_dir: Path, to_stderr: bool) -> None:
    """--jobs K: K processes share the cores and the study (spawned, not forked: torch's threads do not survive a fork).

    to_stderr: the workers' lines go to stderr (stdout carries JSON), else to stdout.
    """
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    workers = [context.Process(target=_worker, args=(settings, name, storage_url, study_dir, i, threads, to_stderr))
               for i in range(settings.jobs)]  # fmt: skip
    for process in workers:
        process.start()
    stopped = []

    def stop(signum: int, frame: object) -> None:
        # A SIGTERM sent to this process alone: pass it on, so that each worker finishes its epoch and stops.
        stopped.append(signum)
        for process in workers:
            if process.is_alive():
                process.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; they finish their epoch
        for process in workers:
            process.join(timeout=120)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped or any(p.exitcode == EXIT_INTERRUPTED for p in workers):
        raise KeyboardInterrupt
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    if failed:
        raise CnnlabError(f"{len(failed)} tune worker(s) failed (exit status {failed[0]}); their errors are printed above")


def _worker(
    settings: TuneSettings, name: str, storage_url: str, study_dir: Path, index: int, threads: int, to_stderr: bool
) -> None:
    torch.set_num_threads(threads)
    progress = Progress(stream=sys.stderr if to_stderr else sys.stdout, bar=False)
    try:
        _search(settings, name, storage_url, study_dir, worker=index, progress=progress)
    except CnnlabError as exc:
        print(f"cnnlab: error: worker {index}: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the parent says what happened and how to continue
        sys.exit(EXIT_INTERRUPTED)


def _sampler(settings: TuneSettings, seed: int):
    import optuna

    if settings.sampler == "grid":
        return optuna.samplers.GridSampler({p.name: p.grid() for p in settings.space}, seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _pruner(name: str):
    import optuna

    if name == "median":
        # Half the trials of a small study would be judged on no history: wait for 4 finished ones.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def final_test(run: RunDirectory, config: TrainConfig) -> float:
    """Test the best trial's run on the test split, the one time the search touches it: its summary.json."""
    splits = load_splits(config.dataset, Path(config.data_dir) if config.data_dir else None, config.val_fraction,
                         config.seed, strict=config.strict_data)  # fmt: skip
    checkpoint, rows = run.load_checkpoint("best"), run.read_metrics()
    stopped = stop_record(config, state_at(run.load_checkpoint("last"), rows=rows, best_accuracy=-1.0))
    result = finish(run, splits=splits, test_data=splits.test, normalization=checkpoint.normalization,
                    rows=rows, config=config, device=torch.device("cpu"), stopped=stopped)  # fmt: skip
    return result.test.evaluation.accuracy


def _summarize(study, settings: TuneSettings, wall: float) -> dict[str, Any]:

    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": t.state.name.lower(), "val_accuracy": t.value if t.value is not None else
             (max(t.intermediate_values.values()) if t.intermediate_values else None),
             "epochs": t.user_attrs.get("epochs", 0), "params": t.params, "run_dir": t.user_attrs.get("run_dir"),
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
             if t.datetime_complete and t.datetime_start else None} for t in trials]  # fmt: skip
    complete = [r for r in rows if r["state"] == "complete"]
    pruned = sum(r["state"] == "pruned" for r in rows)
    finished = len(complete) + pruned
    best = max(complete, key=lambda r: r["val_accuracy"], default=None)
    return {
        "study": study.study_name,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "finished_trials": finished,
        "pruned_trials": pruned,
        "pruned_share": pruned / finished if finished else 0.0,
        "wall_seconds_this_run": wall,
        "best": dict(best) if best else None,
        "trials": rows,
    }


def write_plots(study, study_dir: Path) -> list[Path]:
    """history.png, importances.png and parallel.png (a slice plot with one parameter); those the study has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    plots = {"history.png": views.plot_optimization_history, "importances.png": views.plot_param_importances}
    varied = {name for t in study.trials for name in t.params}
    plots["parallel.png" if len(varied) > 1 else "slice.png"] = (
        views.plot_parallel_coordinate if len(varied) > 1 else views.plot_slice
    )
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this view
                continue
            figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            figure.savefig(study_dir / name, dpi=100)
            plt.close(figure)
            written.append(study_dir / name)
    return written


def summary_table(summary: dict[str, Any], top: int = 10) -> str:
    """The best `top` trials, then the counts: the table `cnnlab tune` prints."""
    rows = sorted(summary["trials"], key=lambda r: -(r["val_accuracy"] or -1))[:top]
    names = sorted({k for r in rows for k in r["params"]})
    header = f"{'trial':>5} {'state':<8} {'val acc':>7} {'epochs':>6}  " + "  ".join(f"{n:>12}" for n in names)
    lines = [header]
    for r in rows:
        value = f"{100 * r['val_accuracy']:6.2f}%" if r["val_accuracy"] is not None else "      -"
        params = "  ".join(f"{_short(r['params'].get(n, '-')):>12}" for n in names)
        lines.append(f"{r['number']:>5} {r['state']:<8} {value:>7} {r['epochs']:>6}  {params}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, default=str) + "\n"
