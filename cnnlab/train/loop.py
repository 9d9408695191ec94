"""The training loop: from a configuration to a finished run directory.

Read top to bottom: `fit` prepares data, model and engine, then runs
`train_one_epoch` and `evaluate` once per epoch, saving a checkpoint after
each, and finally tests the best model. One optimizer step is
zero_grad -> forward -> loss -> backward -> step, inside the engine.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cnnlab
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import DatasetSplits, ImageDataset, Normalization
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.train.averaging import WeightAverage
from cnnlab.train.checkpoint import Checkpoint
from cnnlab.engine import make_engine
from cnnlab.engine.step import Engine
from cnnlab.train.evaluate import Report, evaluate, report
from cnnlab.train.plots import plot_confusion, plot_curves
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory, code_version
from cnnlab.train.schedule import learning_rate


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    test: Report
    rows: list[dict[str, float]]


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


def fit(config: TrainConfig, run: RunDirectory, progress: Progress, resume: Checkpoint | None = None) -> RunResult:
    """Train `config` into `run`; with `resume`, continue from that checkpoint exactly."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    splits = load_splits(
        config.dataset, _path_or_none(config.data_dir), config.val_fraction, config.seed, strict=config.strict_data
    )
    normalization = normalization_for(splits) if resume is None else resume.normalization
    model = create_model(config.model, splits.image_shape, len(splits.classes))
    model_info = {"name": config.model, "in_shape": list(splits.image_shape), "num_classes": len(splits.classes)}
    train_data, val_data, test_data = (s.to(device) for s in (splits.train, splits.val, splits.test))

    # The shuffling order has its own generator so that resuming can restore it
    # without touching the global RNG, which dropout and initialisation use.
    shuffle = torch.Generator().manual_seed(config.seed)
    augmenter = make_augmenter(config, device)
    start_epoch, step, rows, best_accuracy = 0, 0, [], -1.0
    if resume is not None:
        saved = resume.build_model()  # checks that the weights fit the model
        model.load_state_dict(saved.state_dict() if resume.training_state is None else resume.training_state)
    model.to(device)
    engine = make_engine(model, config)
    # With --ema, validation, checkpoints and the test use the weights' moving average.
    average = WeightAverage(model, config.ema, updates=resume.step if resume else 0) if config.ema else None
    if average is not None and resume is not None and resume.training_state is not None:
        average.model.load_state_dict(resume.model_state)
    evaluated = average.model if average is not None else model
    if resume is not None:
        engine.load_optimizer_state(resume.optimizer_state)
        torch.set_rng_state(resume.rng["torch"])
        shuffle.set_state(resume.rng["shuffle"])
        if augmenter is not None:
            augmenter.load_state_dict({"generator": resume.rng["augment"]})
        start_epoch, step = resume.epoch, resume.step
        rows = [r for r in run.read_metrics() if r["epoch"] <= start_epoch]
        best_accuracy = max((r["val_accuracy"] for r in rows), default=-1.0)
    run.prepare()
    # Rewritten on resume too: --epochs may have grown, and config.yaml must describe the whole run.
    run.write_config(config.to_dict())

    steps_per_epoch = -(-len(train_data) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    progress.message(
        f"training {config.model} on {config.dataset} ({len(train_data)} train / {len(val_data)} val / "
        f"{len(test_data)} test) on {device}, {config.engine} engine, into {run.path}"
    )
    for epoch in range(start_epoch + 1, config.epochs + 1):
        progress.start_epoch(epoch, config.epochs, steps_per_epoch)
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_data), generator=shuffle).to(device)
        train_loss, train_accuracy, step = train_one_epoch(
            engine, train_data, order, normalization, config, step, total_steps, augmenter, progress, average
        )
        seconds = time.perf_counter() - started
        val = evaluate(evaluated, val_data, normalization)
        row = {
            "epoch": epoch,
            "lr": learning_rate(config.optim, max(step - 1, 0), steps_per_epoch, total_steps),
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "seconds": seconds,
            "images_per_s": len(train_data) / seconds,
        }
        rows.append(row)
        checkpoint = Checkpoint(
            model=model_info,
            model_state=evaluated.state_dict(),
            training_state=model.state_dict() if average is not None else None,
            normalization=normalization,
            classes=splits.classes,
            dataset=config.dataset,
            epoch=epoch,
            step=step,
            optimizer_state=engine.optimizer_state(),
            rng={
                "torch": torch.get_rng_state(),
                "shuffle": shuffle.get_state(),
                **({"augment": augmenter.state_dict()["generator"]} if augmenter is not None else {}),
            },
            config=config.to_dict(),
            metrics={k: v for k, v in row.items()},
        )
        # Without a validation split, the latest epoch counts as the best one. A tie goes
        # to the later epoch: small validation splits (digits: 144 images) often sit at
        # the same accuracy for several epochs while the annealing schedule still improves
        # the model, and the earliest of them tests up to 1% worse.
        if val_data and val.accuracy >= best_accuracy or not val_data:
            best_accuracy = val.accuracy
            run.save_checkpoint("best", checkpoint)
        run.save_checkpoint("last", checkpoint)
        run.write_metrics(rows)
        progress.end_epoch(row, config.epochs)

    return finish(run, splits, test_data, normalization, rows, config, device)


def train_one_epoch(
    engine: Engine,
    data: ImageDataset,
    order: torch.Tensor,
    normalization: Normalization,
    config: TrainConfig,
    step: int,
    total_steps: int,
    augmenter,
    progress: Progress,
    average: WeightAverage | None = None,
) -> tuple[float, float, int]:
    """One pass over `data` in `order`, updating `average` after each step when given.

    Returns (mean loss, accuracy, the next step number).
    """
    steps_per_epoch = -(-len(data) // config.batch_size)
    # Running sums stay on the device: reading them every batch would force a sync.
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.images.device)
    for start in range(0, len(data), config.batch_size):
        index = order[start : start + config.batch_size]
        # index_select, not labels[index]: the same rows, several times faster on a CPU.
        labels = data.labels.index_select(0, index)  # (B,) int64
        x = normalization.apply(data.images, index)  # (B, C, H, W) float32
        if augmenter is not None:
            x = augmenter(x)
        lr = learning_rate(config.optim, step, steps_per_epoch, total_steps)
        loss, logits = engine.train_step(x, labels, lr)
        if not torch.isfinite(loss):
            raise CnnlabError(
                f"the loss became {loss.item()} at step {step}: training diverged; lower --lr or set --grad-clip"
            )
        if average is not None:
            average.update()
        loss_sum += loss.to(torch.float64) * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        step += 1
        progress.batch_done(loss.item() if progress.bar else None)
    return loss_sum.item() / len(data), correct.item() / len(data), step


def finish(
    run: RunDirectory,
    splits: DatasetSplits,
    test_data: ImageDataset,
    normalization: Normalization,
    rows: list[dict[str, float]],
    config: TrainConfig,
    device: torch.device,
) -> RunResult:
    """Test the best checkpoint and write the run's summary, curves and confusion matrix."""
    best = run.load_checkpoint("best")
    model = best.build_model().to(device)
    test = report(model, test_data, normalization)
    run.write_text("confusion_matrix.csv", _confusion_csv(test, splits.classes))
    plot_confusion(test.confusion, splits.classes, run.file("confusion_matrix.png"))
    plot_curves(rows, run.file("curves.png"))
    run.write_json(
        "summary.json",
        {
            "test_accuracy": test.evaluation.accuracy,
            "test_loss": test.evaluation.loss,
            "best_epoch": best.epoch,
            "epochs": config.epochs,
            "train_seconds": sum(r["seconds"] for r in rows),
            "test": test.to_dict(),
            "classes": list(splits.classes),
            "versions": {
                "cnnlab": cnnlab.__version__,
                "git_commit": code_version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(device),
            },
        },
    )
    return RunResult(run.path, test, rows)


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


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None
