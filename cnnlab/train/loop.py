"""The training loop: from a configuration to a finished run directory.

Read top to bottom: `fit` sets the run up (`prepare`), starts it or puts it back
where a checkpoint left it (`restore`), then for each epoch trains (`train_epoch`,
which calls `train_one_epoch`), validates (`validate_epoch`) and saves
(`save_epoch`) until the last epoch or early stopping (`--patience`, `stop_early`),
and finally tests the best model (`finish`). One optimizer step
is zero_grad -> forward -> loss -> backward -> step, inside the engine.

SIGINT and SIGTERM do not cut a run short at a random point: while `fit` runs, the
first one lets the step in progress finish, saves the run there as `last.pt` (with
how far the epoch had come, `EpochSoFar`, so that a resume trains the rest of the
same epoch in the same order and ends with the same weights), then stops with
`Interrupted`; a second one stops at once, keeping the files already saved.
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

import cnnlab
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import DatasetSplits, ImageDataset, Normalization
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.train.averaging import WeightAverage
from cnnlab.train.calibrate import record_calibration
from cnnlab.train.checkpoint import Checkpoint
from cnnlab.train.diagnostics import Diagnostics, read_diagnostics
from cnnlab.engine import make_engine
from cnnlab.engine.step import Engine
from cnnlab.train.distributed import ONE_PROCESS, World
from cnnlab.train.evaluate import Report
from cnnlab.train.plots import plot_confusion, plot_curves
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory, code_version
from cnnlab.train.schedule import learning_rate
from cnnlab.train.tensorboard import EpochBoard, require_tensorboard
from cnnlab.train.transfer import transfer

if TYPE_CHECKING:
    from cnnlab.data.augment import BatchAugmenter


@dataclass(frozen=True)
class TrainSetup:
    """What stays fixed while a run trains: built once by `prepare`, read by every epoch.

    The generators and the weights inside change as training goes; which objects they are does not.
    """

    config: TrainConfig
    engine: Engine  # trains engine.model, the raw weights, in place
    data: ImageDataset  # the training split, on the training device
    normalization: Normalization
    steps_per_epoch: int
    total_steps: int  # over config.epochs: the learning-rate schedule is laid over them
    # The shuffling order has its own generator so that resuming can restore it
    # without touching the global RNG, which dropout and initialisation use.
    shuffle: torch.Generator
    augmenter: BatchAugmenter | None  # None without augmentation
    average: WeightAverage | None  # with --ema: the weights validated, saved and tested
    progress: Progress
    diagnostics: Diagnostics  # measures each epoch's first step
    world: World  # this process's place in a data-parallel job; World() on one process

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation, checkpoints and the test use: the average with --ema, else the trained ones."""
        return self.average.model if self.average is not None else self.engine.model


@dataclass
class EpochSoFar:
    """How far an epoch has come: its first `batches` batches trained, the sum of their losses (each times its
    global batch's size; float64), their correct predictions over every rank, and the seconds it took.

    shuffle: the shuffling generator's state before the epoch's order was drawn, which a checkpoint saved
    mid-epoch keeps so that the resumed run draws the same order and skips the batches already trained.
    """

    shuffle: torch.Tensor | None = None
    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "loss_sum": self.loss_sum, "correct": self.correct, "seconds": self.seconds}

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> EpochSoFar | None:
        """The epoch `checkpoint` stopped inside (None: it was saved at an epoch's end)."""
        begun = checkpoint.epoch_begun
        if begun is None:
            return None
        try:
            batches, correct = begun["batches"], begun["correct"]
            if type(batches) is not int or type(correct) is not int or batches < 1:  # noqa: E721
                raise TypeError("batches and correct must be whole numbers")
            return cls(None, batches, float(begun["loss_sum"]), correct, float(begun["seconds"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CnnlabError(f"{checkpoint.source}'s record of the epoch in progress is malformed ({exc}): it is corrupt") from None


@dataclass
class RunState:
    """How far a run has come: the last finished epoch, the next step, one metrics row per epoch,
    and the part of the next epoch a checkpoint saved mid-epoch had trained."""

    epoch: int = 0
    step: int = 0
    begun: EpochSoFar | None = None
    rows: list[dict[str, float]] = field(default_factory=list)
    best_accuracy: float = -1.0  # the best validation accuracy so far; -1 before any
    # Early stopping: the accuracy the next epoch must beat by more than --min-delta, and how many
    # epochs in a row have not. Kept in the checkpoint, exact: metrics.csv rounds accuracies.
    target_accuracy: float = -1.0
    epochs_without_improvement: int = 0


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    test: Report | None  # None for a run made with test=False
    rows: list[dict[str, float]]


# Called with each epoch's metrics row once that epoch is saved; raising stops the run there.
EpochCallback = Callable[[dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnlabError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CnnlabError("--device mps asked for, but MPS is not available here: use --device cpu or auto")
    return torch.device(name)


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM. str(): the one line to show; exit_status: 128 + the signal's number.

    A KeyboardInterrupt, so that `except Exception` on the way up does not swallow it.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


class StopRequests:
    """While in effect (a `with` block in the main thread), SIGINT and SIGTERM ask training to stop.

    The first signal is recorded in `signum`; a second raises KeyboardInterrupt at
    once. The handlers in place before are restored when the block ends.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved = 0  # the last epoch whose checkpoint is on disk, for the message of a stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if not first:
            raise KeyboardInterrupt


def fit(
    config: TrainConfig,
    run: RunDirectory,
    progress: Progress,
    resume: Checkpoint | None = None,
    world: World = ONE_PROCESS,
    *,
    on_epoch: EpochCallback | None = None,
    test: bool = True,
) -> RunResult:
    """Train `config` into `run`; with `resume`, continue from that checkpoint exactly.

    world: this process's rank in a data-parallel job (cnnlab.train.distributed), one process by default.
    on_epoch: called after each epoch is saved (a hyper-parameter search reports and
    prunes there). test=False: the test split is dropped as soon as the data is loaded,
    and the run ends after its last epoch, untested (a search chooses on validation only).

    Raises `Interrupted` when SIGINT or SIGTERM stops it (see the module's docstring).
    Lets go of `run` (RunDirectory.release) when it returns, however it returns.
    """
    try:
        if resume is not None:
            world.agree(lambda: check_resumable(config, resume, run))
        with StopRequests() as stop:
            try:
                return _fit(config, run, progress, resume, stop, world, on_epoch, test)
            except KeyboardInterrupt as exc:
                if isinstance(exc, Interrupted):
                    raise
                message = _stopped_message(run, config, stop.saved, at_once=True)
                raise Interrupted(stop.signum or signal.SIGINT, message) from None
    finally:
        run.release()


def check_resumable(config: TrainConfig, resume: Checkpoint, run: RunDirectory) -> None:
    """Refuse a resume that cannot continue `resume` exactly, or has nothing left to do.

    One-cycle and cosine schedules are laid over the run's planned length: another
    --epochs would change the rate of every step still to run, and config.yaml would
    describe a schedule no step followed. A run whose epochs are all done but which
    was stopped before its test resumes to run the test.
    """
    done, schedule = resume.epoch, config.optim.schedule
    planned = int((resume.config or {}).get("epochs", done))
    if config.epochs == done and run.is_finished() or config.epochs < done:
        longer = (
            f"start a new run with the --epochs you want (its {schedule} schedule was laid over {planned} epochs, "
            "so more cannot continue it exactly)"
            if schedule in ("onecycle", "cosine")
            else f"resume with --epochs N, N > {done}"
        )
        if config.epochs == done:
            raise CnnlabError(f"{run.path} is finished: its {done} epochs are trained and tested, so there is "
                              f"nothing to resume; to train longer, {longer}")  # fmt: skip
        raise CnnlabError(f"{run.path} already has {done} epochs, more than --epochs {config.epochs}: {longer}")
    if schedule in ("onecycle", "cosine") and config.epochs != planned:
        raise CnnlabError(
            f"{run.path} follows a {schedule} learning-rate schedule laid over {planned} epochs; --epochs {config.epochs} "
            f"would change it for the steps still to run, so the run would not continue exactly: resume with "
            f"--epochs {planned} (or without --epochs), or start a new run with --epochs {config.epochs}"
        )


def _stopped_message(
    run: RunDirectory, config: TrainConfig, saved: int, *, at_once: bool, within: tuple[int, int] | None = None
) -> str:
    """The one line an interrupted run ends with: where it stopped, and the command that continues it.

    saved: the last epoch saved whole; within: (epoch, batches) when the run was saved inside that epoch.
    """
    if within is not None:
        epoch, batches = within
        how = f"saved after {batches} batches of epoch {epoch} of {config.epochs}"
    elif saved == 0:
        return f"interrupted before the first epoch was saved; start the run again (the same command replaces {run.path})"
    else:
        how = f"stopped at once; epoch {saved} is saved" if at_once else f"finished and saved epoch {saved} of {config.epochs}"
    return (
        f"interrupted; {how}; continue with: "
        f"cnnlab train --resume {shlex.quote(str(run.path))} --epochs {config.epochs}"
    )


def _fit(
    config: TrainConfig,
    run: RunDirectory,
    progress: Progress,
    resume: Checkpoint | None,
    stop: StopRequests,
    world: World,
    on_epoch: EpochCallback | None,
    test: bool,
) -> RunResult:
    stop.saved = resume.epoch if resume is not None else 0  # the last epoch whose checkpoint is on disk
    device = world.agree(lambda: resolve_device(config.device))
    world.check(config, device)
    device = world.device(device)
    torch.manual_seed(config.seed)
    splits = world.agree(lambda: load_splits(
        config.dataset, _path_or_none(config.data_dir), config.val_fraction, config.seed, strict=config.strict_data
    ))  # fmt: skip
    if not test:
        splits = dataclasses.replace(splits, test=_withheld(splits))
    setup = world.agree(lambda: prepare(config, splits=splits, device=device, progress=progress, resume=resume, world=world))
    state = restore(setup, resume=resume, run=run) if resume is not None else RunState()
    if config.tensorboard:
        require_tensorboard()
    run.prepare()
    board = EpochBoard(run.path) if config.tensorboard and run.writes else None
    # Rewritten on resume too: --epochs may have grown, and config.yaml must describe the whole run.
    run.write_config(config.to_dict())
    val_data, test_data = splits.val.to(device), splits.test.to(device)
    progress.message(
        f"training {config.model} on {config.dataset} ({len(setup.data)} train / {len(val_data)} val / "
        f"{len(test_data)} test) on {device}, {config.engine} engine, into {run.path}"
    )
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if stop_early(config, state):  # checked first: a resumed run that had stopped early stays stopped
            break
        # A stop asked for while the last epoch was validated and saved.
        if world.any(stop.signum is not None):
            raise Interrupted(stop.signum or signal.SIGTERM, _stopped_message(run, config, stop.saved, at_once=False))
        # Every rank asks after each step: a stop asked of one stops them all after the same step.
        so_far = train_epoch(setup, state, epoch=epoch, stop_asked=lambda: world.any(stop.signum is not None))
        finished = so_far.batches == setup.steps_per_epoch
        row = validate_epoch(setup, state, so_far, epoch=epoch, val_data=val_data) if finished else None
        try:
            if row is not None:
                save_epoch(run, setup, state, row=row, splits=splits, has_val=len(val_data) > 0)
            else:
                save_within_epoch(run, setup, state, so_far, splits=splits)
        except CnnlabError as exc:  # a full disk: the previous checkpoint is kept, so say how to go on from it
            if stop.saved == 0:
                raise
            raise CnnlabError(
                f"{exc}; then continue with: cnnlab train --resume {shlex.quote(str(run.path))} --epochs {config.epochs}"
            ) from None
        if row is None:
            message = _stopped_message(run, config, stop.saved, at_once=False, within=(epoch, so_far.batches))
            raise Interrupted(stop.signum or signal.SIGTERM, message)
        stop.saved = epoch
        progress.end_epoch(row, config.epochs)
        if board is not None:
            board.log(row, next((e for e in read_diagnostics(run.path) if e["epoch"] == epoch), None))
        if on_epoch is not None:
            on_epoch(row)
    if board is not None:
        board.close()
    if not test:
        if run.writes:
            plot_curves(state.rows, run.file("curves.png"))
        return RunResult(run.path, None, state.rows)
    return finish(
        run,
        splits=splits,
        test_data=test_data,
        normalization=setup.normalization,
        rows=state.rows,
        config=config,
        device=device,
        stopped=stop_record(config, state),
        world=world,
    )


def stop_early(config: TrainConfig, state: RunState) -> bool:
    """Whether --patience epochs in a row have passed without the validation accuracy improving."""
    return 0 < config.patience <= state.epochs_without_improvement


def track_improvement(config: TrainConfig, state: RunState, val_accuracy: float) -> None:
    """Count the epoch towards --patience unless its validation accuracy beats the target by more than --min-delta."""
    if val_accuracy > state.target_accuracy + config.min_delta:
        state.target_accuracy, state.epochs_without_improvement = val_accuracy, 0
    else:
        state.epochs_without_improvement += 1


def stop_record(config: TrainConfig, state: RunState) -> dict:
    """summary.json's "stopped": why training ended, after which epoch, and in words."""
    if stop_early(config, state) and state.epoch < config.epochs:
        best = state.epoch - state.epochs_without_improvement
        return {
            "reason": "early_stopping",
            "epoch": state.epoch,
            "detail": f"validation accuracy did not improve by more than {config.min_delta:g} for {config.patience} "
            f"epochs after epoch {best} ({100 * state.target_accuracy:.2f}%)",
        }
    return {"reason": "completed", "epoch": state.epoch, "detail": f"all {config.epochs} epochs trained"}


def prepare(
    config: TrainConfig,
    *,
    splits: DatasetSplits,
    device: torch.device,
    progress: Progress,
    resume: Checkpoint | None,
    world: World = ONE_PROCESS,
) -> TrainSetup:
    """The model (initialised from the seed, --init-from's weights or `resume`'s), its engine, data and generators.

    The order matters for reproducibility: the model is the first thing after loading
    the data to draw from the global RNG.
    """
    normalization = normalization_for(splits) if resume is None else resume.normalization
    model = create_model(config.model, splits.image_shape, len(splits.classes), dropout=config.dropout)
    data = splits.train.to(device)
    shuffle = torch.Generator().manual_seed(config.seed)
    augmenter = make_augmenter(config, device)
    world.seed_ranks(config.seed, augmenter)
    if resume is not None:
        saved = resume.build_model()  # checks that the weights fit the model
        model.load_state_dict(saved.state_dict() if resume.training_state is None else resume.training_state)
    # --init-from and --freeze, before the engine: it trains only what requires gradients
    if transferred := transfer(model, config, splits.classes, resumed=resume is not None):
        progress.message(transferred)
    engine = make_engine(model.to(device), config)
    world.attach(engine, sync_bn=config.sync_bn)
    steps_per_epoch = -(-len(data) // config.batch_size)
    return TrainSetup(
        config=config,
        engine=engine,
        data=data,
        normalization=normalization,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs,
        shuffle=shuffle,
        augmenter=augmenter,
        average=_weight_average(model, config, resume),
        progress=progress,
        diagnostics=Diagnostics(engine, config.engine),
        world=world,
    )


def _weight_average(model: nn.Module, config: TrainConfig, resume: Checkpoint | None) -> WeightAverage | None:
    """With --ema, the moving average of `model`'s weights: where `resume` left it, or starting from them."""
    if not config.ema:
        return None
    average = WeightAverage(model, config.ema, updates=resume.step if resume else 0)
    if resume is not None and resume.training_state is not None:
        average.model.load_state_dict(resume.model_state)
    return average


def restore(setup: TrainSetup, *, resume: Checkpoint, run: RunDirectory) -> RunState:
    """Put the optimizer and every random stream back where `resume` left them; the run's state at that point."""
    setup.engine.load_optimizer_state(resume.optimizer_state)
    rng = setup.world.own_rng(resume.rng)
    torch.set_rng_state(rng["torch"])
    setup.shuffle.set_state(rng["shuffle"])
    if setup.augmenter is not None:
        setup.augmenter.load_state_dict({"generator": rng["augment"]})
    rows = [r for r in run.read_metrics() if r["epoch"] <= resume.epoch]
    best_accuracy = max((r["val_accuracy"] for r in rows), default=-1.0)
    state = state_at(resume, rows=rows, best_accuracy=best_accuracy)
    state.begun = EpochSoFar.of(resume)
    return state


def state_at(checkpoint: Checkpoint, *, rows: list[dict[str, float]], best_accuracy: float) -> RunState:
    """The run's state when `checkpoint` was saved, early-stopping counters included."""
    metrics = checkpoint.metrics or {}
    return RunState(
        epoch=checkpoint.epoch, step=checkpoint.step, rows=rows, best_accuracy=best_accuracy,
        target_accuracy=float(metrics.get("early_stopping_target", -1.0)),
        epochs_without_improvement=int(metrics.get("epochs_without_improvement", 0)),
    )  # fmt: skip


def train_epoch(setup: TrainSetup, state: RunState, *, epoch: int, stop_asked: Callable[[], bool]) -> EpochSoFar:
    """Train epoch `epoch`, from where `state.begun` left it when a run resumes mid-epoch, until its last batch or
    until stop_asked() after a step; moves `state.step` on and returns how far the epoch came."""
    so_far, state.begun = state.begun or EpochSoFar(), None
    so_far.shuffle = setup.shuffle.get_state()  # after a resume mid-epoch, the saved state: restore() put it back
    setup.progress.start_epoch(epoch, setup.config.epochs, setup.steps_per_epoch, done=so_far.batches)
    started = time.perf_counter()
    setup.engine.model.train()
    # Drawn again from the saved state after a stop mid-epoch: the same order, its first batches skipped.
    order = torch.randperm(len(setup.data), generator=setup.shuffle).to(setup.data.images.device)
    state.step = train_one_epoch(setup, order, so_far, step=state.step, stop_asked=stop_asked)
    so_far.seconds += time.perf_counter() - started
    return so_far


def validate_epoch(
    setup: TrainSetup, state: RunState, so_far: EpochSoFar, *, epoch: int, val_data: ImageDataset
) -> dict[str, float]:
    """Validate the trained epoch `epoch`; returns its metrics row, having moved `state` on to its end."""
    config, n = setup.config, len(setup.data)
    state.epoch = epoch
    setup.world.agree_buffers(setup.engine.model, setup.evaluated)
    val = setup.world.evaluate(setup.evaluated, val_data, setup.normalization)
    row = {
        "epoch": epoch,
        "lr": learning_rate(config.optim, max(state.step - 1, 0), setup.steps_per_epoch, setup.total_steps),
        "train_loss": so_far.loss_sum / n,
        "train_accuracy": so_far.correct / n,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "seconds": so_far.seconds,
        "images_per_s": n / so_far.seconds,
    }
    if setup.engine.step.penalty is not None:  # the term the loss adds, at the epoch's end weights (frozen ones left out)
        row["l1_penalty"] = setup.engine.step.penalty.forward().item()
    return row


def save_epoch(
    run: RunDirectory,
    setup: TrainSetup,
    state: RunState,
    *,
    row: dict[str, float],
    splits: DatasetSplits,
    has_val: bool,
) -> None:
    """Record the epoch in `state` and in `run`: its metrics row, its checkpoint as "last", and as "best" if it is."""
    state.rows.append(row)
    track_improvement(setup.config, state, row["val_accuracy"])
    checkpoint = make_checkpoint(setup, splits=splits, state=state, row=row)
    # Without a validation split, the latest epoch counts as the best one. A tie goes
    # to the later epoch: small validation splits (digits: 144 images) often sit at
    # the same accuracy for several epochs while the annealing schedule still improves
    # the model, and the earliest of them tests up to 1% worse.
    # metrics.csv first: a kill after it and before last.pt is undone on resume, which drops rows
    # newer than last.pt; the other order lost the epoch's row for good.
    # diagnostics.json before them: it drops the epochs a resume repeats, so it may run ahead too.
    setup.diagnostics.save(run, state.epoch)
    run.write_metrics(state.rows)
    if not has_val or row["val_accuracy"] >= state.best_accuracy:
        state.best_accuracy = row["val_accuracy"]
        run.save_checkpoint("best", checkpoint)
    run.save_checkpoint("last", checkpoint)


def save_within_epoch(run: RunDirectory, setup: TrainSetup, state: RunState, so_far: EpochSoFar, *,
                      splits: DatasetSplits) -> None:  # fmt: skip
    """Save the run as it stands inside epoch `state.epoch` + 1 as "last", for a resume to finish that epoch."""
    setup.diagnostics.save(run, state.epoch + 1)  # the epoch's first step, measured before the stop
    row = state.rows[-1] if state.rows else {}
    run.save_checkpoint("last", make_checkpoint(setup, splits=splits, state=state, row=row, so_far=so_far))


def make_checkpoint(
    setup: TrainSetup, *, splits: DatasetSplits, state: RunState, row: dict[str, float], so_far: EpochSoFar | None = None
) -> Checkpoint:
    """Everything to use the model (the evaluated weights) and to continue training exactly (the rest):
    from the end of epoch `state.epoch`, or from inside the next one, `so_far` into it."""
    config = setup.config
    return Checkpoint(
        model={
            "name": config.model,
            "in_shape": list(splits.image_shape),
            "num_classes": len(splits.classes),
            "dropout": config.dropout,
        },
        model_state=setup.evaluated.state_dict(),
        training_state=setup.engine.model.state_dict() if setup.average is not None else None,
        normalization=setup.normalization,
        classes=splits.classes,
        dataset=config.dataset,
        epoch=state.epoch,
        step=state.step,
        optimizer_state=setup.engine.optimizer_state(),
        rng=setup.world.gather_rng({
            "torch": torch.get_rng_state(),
            "shuffle": setup.shuffle.get_state() if so_far is None else so_far.shuffle,
            **({"augment": setup.augmenter.state_dict()["generator"]} if setup.augmenter is not None else {}),
        }),
        config=config.to_dict(),
        metrics={
            **row,
            "early_stopping_target": state.target_accuracy,
            "epochs_without_improvement": state.epochs_without_improvement,
        },
        epoch_begun=None if so_far is None else so_far.to_dict(),
    )


def train_one_epoch(
    setup: TrainSetup, order: torch.Tensor, so_far: EpochSoFar, *, step: int, stop_asked: Callable[[], bool] = lambda: False
) -> int:
    """Train the batches of `setup.data` in `order` (a permutation of its indices, on its device) from batch
    `so_far.batches` on, as step `step` onwards, until the last or until stop_asked() after a step.

    Adds the batches, losses and correct predictions to `so_far`, and updates the weight average
    after each step when there is one. Returns the next step number.
    """
    data, config, augmenter, average = setup.data, setup.config, setup.augmenter, setup.average
    # Running sums stay on the device: reading them every batch would force a sync. The loss sum
    # goes on from the saved one rather than beside it, so that a resumed epoch sums the same way.
    loss_sum = torch.tensor(so_far.loss_sum, dtype=torch.float64, device=data.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.images.device)
    for start in range(so_far.batches * config.batch_size, len(data), config.batch_size):
        batch = order[start : start + config.batch_size]
        index = setup.world.shard(batch)  # this process's rows of the batch: all of them on one
        # index_select, not labels[index]: the same rows, several times faster on a CPU.
        labels = data.labels.index_select(0, index)  # (B,) int64
        x = setup.normalization.apply(data.images, index)  # (B, C, H, W) float32
        if augmenter is not None:
            x = augmenter(x)
        lr = learning_rate(config.optim, step, setup.steps_per_epoch, setup.total_steps)
        # The epoch's first step is measured too (gradients, update sizes, activations): diagnostics.py.
        train_step = setup.diagnostics.measured_step if start == 0 else setup.engine.train_step
        loss, logits = train_step(x, labels, lr, batch=len(batch))
        if not torch.isfinite(loss):
            setup.world.refuse(  # the loss is the whole batch's, so every rank stops here
                f"the loss became {loss.item()} at step {step}: training diverged; lower --lr or set --grad-clip"
            )
        if average is not None:
            average.update()
        loss_sum += loss.to(torch.float64) * len(batch)
        correct += (logits.argmax(dim=1) == labels).sum()
        step += 1
        so_far.batches += 1
        setup.progress.batch_done(loss.item() if setup.progress.bar else None)
        if stop_asked():
            break
    so_far.loss_sum = loss_sum.item()
    so_far.correct += int(setup.world.total(correct).item())
    return step


def finish(
    run: RunDirectory,
    *,
    splits: DatasetSplits,
    test_data: ImageDataset,
    normalization: Normalization,
    rows: list[dict[str, float]],
    config: TrainConfig,
    device: torch.device,
    stopped: dict,
    world: World = ONE_PROCESS,
) -> RunResult:
    """Test the best checkpoint and write the run's summary, curves and confusion matrix, and keep its
    calibration (cnnlab/train/calibrate.py) beside it.

    stopped: why and after which epoch training ended (`stop_record`), for summary.json.
    """
    best = run.load_checkpoint("best")
    model = best.build_model().to(device)
    test = Report.of(world.evaluate(model, test_data, normalization), test_data)
    run.write_text("confusion_matrix.csv", _confusion_csv(test, splits.classes))
    if run.writes:
        plot_confusion(test.confusion, splits.classes, run.file("confusion_matrix.png"))
        plot_curves(rows, run.file("curves.png"))
    summary = _summary(test, best_epoch=best.epoch, rows=rows, config=config, classes=splits.classes, device=device)
    summary["stopped"] = stopped
    run.write_json("summary.json", summary)
    if run.writes:  # what predict and serve need of the training data, measured now that the splits are at hand
        record_calibration(best, model, splits)
    return RunResult(run.path, test, rows)


def _summary(
    test: Report,
    *,
    best_epoch: int,
    rows: list[dict[str, float]],
    config: TrainConfig,
    classes: tuple[str, ...],
    device: torch.device,
) -> dict:
    """summary.json: the test figures, which epoch they come from, and the versions that made them."""
    return {
        "test_accuracy": test.evaluation.accuracy,
        "test_loss": test.evaluation.loss,
        "best_epoch": best_epoch,
        "epochs": config.epochs,
        "world_size": config.world_size,
        "train_seconds": sum(r["seconds"] for r in rows),
        "test": test.to_dict(),
        "classes": list(classes),
        "versions": {
            "cnnlab": cnnlab.__version__,
            "git_commit": code_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
        },
    }


def _confusion_csv(test: Report, classes: tuple[str, ...]) -> str:
    header = "true\\predicted," + ",".join(f'"{c}"' for c in classes)
    lines = [f'"{c}",' + ",".join(str(int(v)) for v in row) for c, row in zip(classes, test.confusion)]
    return "\n".join([header, *lines]) + "\n"


def make_augmenter(config: TrainConfig, device: torch.device):
    """The batch augmenter `config.augment` asks for, or None when it asks for nothing."""
    if not config.augment.enabled():
        return None
    from cnnlab.data.augment import BatchAugmenter

    return BatchAugmenter(config.augment, config.seed, device)


def _withheld(splits: DatasetSplits) -> ImageDataset:
    """An empty split in place of the test split (made without touching it), so that nothing in an untested run reads it."""
    return splits.train.subset(torch.empty(0, dtype=torch.int64))


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None
