"""`cnnlab prune`: a trained run made smaller, fine-tuned between steps, written as a new run.

Two methods, both iterative: K steps, each removing a share so that after step k
a fraction (1 - amount)^(k/K) is left, each followed by fine-tuning on the
training split.

- global-magnitude: the smallest weights of all Conv2d and Linear layers taken
  together are masked with torch.nn.utils.prune (a layer that matters less loses
  more); the masks are made permanent at the end, so the model is an ordinary
  dense one with `amount` of those weights exactly zero. Sparse, not faster:
  dense kernels multiply the zeros too.
- channels: the convolution channels and hidden units with the smallest L1 norm
  are cut out, and a smaller dense model holds the rest: `amount` of every
  layer's, or down to the given `widths` layer by layer (the layers that cost
  time need not be the ones that can spare channels). Its layer widths are
  recorded in the checkpoint (cnnlab.models.widths), so evaluate, predict,
  export and serve rebuild it like any model. Fewer channels are less work: it
  is faster, not only smaller.

The new run (RUN-METHOD-AMOUNT beside RUN by default) is tested on the test
split like any run (summary.json); prune.json holds the before/after figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from cnnlab.config import TrainConfig, resolve_config
from cnnlab.data.dataset import DatasetSplits, Normalization
from cnnlab.data.sources import load_splits
from cnnlab.errors import CnnlabError
from cnnlab.models.widths import layer_widths, with_widths
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint
from cnnlab.train.evaluate import evaluate
from cnnlab.train.loop import finish, make_augmenter
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory

METHODS = ("global-magnitude", "channels")


@dataclass(frozen=True)
class PruneSettings:
    amount: float | None  # share of the weights (global-magnitude) or of the channels and units (channels) removed
    method: str = "global-magnitude"
    widths: tuple[int, ...] | None = None  # channels: each layer's width at the end, instead of `amount`
    steps: int = 3
    finetune_epochs: int = 2  # per step
    lr: float = 0.01  # fine-tuning's peak rate, annealed to 0 over each step's epochs (cosine)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CnnlabError(f"unknown pruning method '{self.method}': choose one of {', '.join(METHODS)}")
        if (self.amount is None) == (self.widths is None):
            raise CnnlabError("give --amount (the share removed) or, with --method channels, --widths (what is left)")
        if self.widths is not None and self.method != "channels":
            raise CnnlabError("--widths narrows layers: use it with --method channels")
        if self.amount is not None and not 0 < self.amount < 1:
            raise CnnlabError(f"--amount must be in (0, 1), the share removed (0.8 removes 80%), got {self.amount}")
        if self.steps < 1 or self.finetune_epochs < 0:
            raise CnnlabError(f"--steps must be >= 1 and --finetune-epochs >= 0, got {self.steps} and {self.finetune_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CnnlabError(f"--lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class Pruned:
    """A pruned model: (N, C, H, W) float32 normalized -> (N, K) logits, with its widths when channels were cut."""

    model: nn.Sequential
    widths: list[int] | None
    rows: list[dict[str, float]]  # one metrics row per fine-tuning epoch


def source_checkpoint(run: Path) -> Path:
    """The best checkpoint of `run` (a run directory or a .pt file); CnnlabError without one."""
    run = Path(run)
    if run.is_dir():
        best = run / "checkpoints" / "best.pt"
        if not best.is_file():
            raise CnnlabError(f"{run} has no checkpoints/best.pt: prune a run that has finished at least one epoch")
        return best
    if not run.is_file():
        raise CnnlabError(f"{run} does not exist: pass a run directory or a checkpoint file")
    return run


def prune_run(
    source: Path, settings: PruneSettings, out: Path | None, overwrite: bool, progress: Progress
) -> tuple[RunDirectory, dict[str, Any]]:
    """Prune `source`'s best model into a new run at `out`; the run and its figures (also in prune.json)."""
    from cnnlab.tools.compare import compare  # needs the export extra (ONNX, ONNX Runtime)

    settings.validate()
    path = source_checkpoint(source)
    checkpoint = load_checkpoint(path)
    config = resolve_config(checkpoint.config or {"model": checkpoint.model["name"], "dataset": checkpoint.dataset},
                            origin=str(path), recipe=False)  # fmt: skip
    if settings.method == "channels":  # refuses models that cannot be narrowed, and widths that do not fit
        final_widths(settings, layer_widths(checkpoint.build_model(), checkpoint.model["name"]), config.model)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    how_much = "-".join(map(str, settings.widths)) if settings.widths else round(100 * settings.amount)
    target = out or run_dir.with_name(f"{run_dir.name}-{settings.method}-{how_much}")
    run = RunDirectory.create(target, overwrite=overwrite)
    splits = load_splits(config.dataset, Path(config.data_dir) if config.data_dir else None, config.val_fraction,
                         config.seed, strict=config.strict_data)  # fmt: skip
    torch.manual_seed(config.seed)
    pruned = prune_model(checkpoint.build_model(), checkpoint.normalization, splits, config, settings, progress)
    run.prepare()
    run.write_config(config.to_dict())
    run.write_metrics(pruned.rows)
    run.save_checkpoint("best", _pruned_checkpoint(checkpoint, pruned))
    stopped = {"reason": "completed", "epoch": len(pruned.rows),
               "detail": f"{settings.method} pruning of {path}, {len(pruned.rows)} fine-tuning epochs in all"}  # fmt: skip
    finish(run, splits=splits, test_data=splits.test, normalization=checkpoint.normalization, rows=pruned.rows,
           config=config, device=torch.device("cpu"), stopped=stopped)  # fmt: skip
    figures = compare(path, run.checkpoints / "best.pt", splits.test)
    figures["settings"] = {**vars(settings)}
    run.write_json("prune.json", figures)
    return run, figures


def prune_model(
    model: nn.Sequential,
    normalization: Normalization,
    splits: DatasetSplits,
    config: TrainConfig,
    settings: PruneSettings,
    progress: Progress,
) -> Pruned:
    """Prune `model` in `settings.steps` steps, fine-tuning on `splits.train` after each."""
    rows: list[dict[str, float]] = []
    widths = None

    if settings.method == "global-magnitude":
        layers = [(layer, "weight") for layer in model if isinstance(layer, (nn.Conv2d, nn.Linear))]
        total = sum(layer.weight.numel() for layer, _ in layers)
        removed = 0
        for step in range(1, settings.steps + 1):
            # Counts, not fractions: the last step lands exactly on `amount`, whatever the rounding before.
            goal = round(total * (1 - (1 - settings.amount) ** (step / settings.steps)))
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=goal - removed)
            removed = goal
            progress.message(f"step {step}/{settings.steps}: {100 * goal / total:.1f}% of the weights zeroed")
            rows += finetune(model, normalization, splits, config, settings, step, progress)
        for layer, name in layers:
            prune.remove(layer, name)  # weight = weight_orig * mask, for good
    else:
        original = layer_widths(model, config.model)
        final = final_widths(settings, original, config.model)
        for step in range(1, settings.steps + 1):
            # The same share of each layer's remaining width goes at every step.
            widths = [max(1, round(o * (w / o) ** (step / settings.steps))) for w, o in zip(final, original)]
            model = narrowed(model, widths)
            progress.message(f"step {step}/{settings.steps}: layer widths {original} -> {widths}")
            rows += finetune(model, normalization, splits, config, settings, step, progress)
    for number, row in enumerate(rows, start=1):
        row["epoch"] = number
    return Pruned(model.eval(), widths, rows)


def final_widths(settings: PruneSettings, original: list[int], model_name: str) -> list[float]:
    """Each narrowed layer's width at the end (--widths, or `amount` less of each), checked against `original`."""
    if settings.widths is None:
        return [w * (1 - settings.amount) for w in original]
    final = list(settings.widths)
    if len(final) != len(original) or not all(1 <= w <= o for w, o in zip(final, original)):
        raise CnnlabError(f"--widths {','.join(map(str, final))} do not fit {model_name}: give {len(original)} "
                          f"widths, each from 1 to the layer's own ({','.join(map(str, original))})")  # fmt: skip
    return final


def narrowed(model: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """`model` with only its strongest channels and units: each Conv2d and hidden Linear keeps the
    `widths[i]` outputs with the largest L1 norm, and the next layer keeps the matching inputs."""
    smaller = with_widths(model, widths)
    resized = [layer for layer in model if isinstance(layer, (nn.Conv2d, nn.Linear))]
    kept = None  # indices of the previous resized layer's outputs that remain
    kept_of = 0  # how many outputs that layer had
    after_flatten = False
    for old, new in zip(model, smaller):
        if isinstance(old, nn.Flatten):
            after_flatten = True
        if isinstance(old, (nn.Conv2d, nn.Linear)):
            norms = old.weight.detach().abs().flatten(1).sum(dim=1)  # (out,)
            width = new.weight.shape[0]
            keep = torch.arange(width) if old is resized[-1] else norms.topk(width).indices.sort().values
            weight = old.weight.detach()[keep]
            if kept is not None:
                columns = kept
                if isinstance(old, nn.Linear) and after_flatten:
                    # Flatten lays (C, H, W) out channel by channel: channel c owns inputs c*H*W ... (c+1)*H*W - 1.
                    per_channel = old.in_features // kept_of
                    columns = (kept[:, None] * per_channel + torch.arange(per_channel)).flatten()
                weight = weight[:, columns]
            with torch.no_grad():
                new.weight.copy_(weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias.detach()[keep])
            kept, kept_of, after_flatten = keep, old.weight.shape[0], False
        elif isinstance(old, nn.BatchNorm2d) and kept is not None:
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, name).copy_(getattr(old, name)[kept])
    return smaller


def finetune(
    model: nn.Sequential,
    normalization: Normalization,
    splits: DatasetSplits,
    config: TrainConfig,
    settings: PruneSettings,
    step: int,
    progress: Progress,
) -> list[dict[str, float]]:
    """Fine-tune `model` in place on the training split (SGD with momentum, cosine from settings.lr to 0)
    with the run's batch size, label smoothing, weight decay and augmentation; one metrics row per epoch."""
    import time

    epochs = settings.finetune_epochs
    if epochs == 0:
        return []
    data = splits.train
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.optim.weight_decay)  # fmt: skip
    batches = -(-len(data) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches)
    augmenter = make_augmenter(config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.seed + step)
    rows = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(data), generator=generator)
        loss_sum, correct, lr = 0.0, 0, settings.lr
        for start in range(0, len(data), config.batch_size):
            index = order[start : start + config.batch_size]
            labels = data.labels.index_select(0, index)  # (B,) int64
            x = normalization.apply(data.images, index)  # (B, C, H, W) float32
            if augmenter is not None:
                x = augmenter(x)
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
        seconds = time.perf_counter() - started
        val = evaluate(model, splits.val, normalization)
        rows.append({"epoch": 0, "lr": lr, "train_loss": loss_sum / len(data), "train_accuracy": correct / len(data),
                     "val_loss": val.loss, "val_accuracy": val.accuracy, "seconds": seconds,
                     "images_per_s": len(data) / seconds})  # fmt: skip
        progress.message(f"  fine-tune epoch {len(rows)}/{epochs}: train loss {rows[-1]['train_loss']:.4f}, "
                         f"val accuracy {100 * val.accuracy:.2f}%, {seconds:.1f}s")  # fmt: skip
    model.eval()
    return rows


def _pruned_checkpoint(source: Checkpoint, pruned: Pruned) -> Checkpoint:
    """The pruned weights in a checkpoint that describes itself like the source's, with the widths kept."""
    model = dict(source.model)
    if pruned.widths is not None:
        model["widths"] = pruned.widths
    metrics = dict(pruned.rows[-1]) if pruned.rows else source.metrics
    return Checkpoint(model=model, model_state=pruned.model.state_dict(), normalization=source.normalization,
                      classes=source.classes, dataset=source.dataset, epoch=source.epoch, step=source.step,
                      config=source.config, metrics=metrics)  # fmt: skip
