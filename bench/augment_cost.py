"""What batched augmentation costs: its share of a LeNet-5 training epoch on Fashion-MNIST.

Times training epochs with and without augmentation, alternating, on the same
data, model and batch order, through the training loop's own
`train_one_epoch`. Two figures come out:

    share (end to end) = (epoch with - epoch without) / epoch with
    share (direct)     = time inside the augmenter / epoch with

The direct figure times only the augmenter's calls (synchronizing a GPU around
each), so it is less exposed to the noise of a shared machine; the end-to-end
figure is what a user sees. Goal: under 15%. Every augmentation is on, which
is the dearest setting.

    python bench/augment_cost.py [--device cpu] [--epochs 3] [--accuracy]

--accuracy also trains LeNet-5 for 20 epochs with and without augmentation and
reports test accuracy (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cnnlab.atomicfile import atomic_write_text
from cnnlab.config import AugmentConfig, OptimConfig, TrainConfig
from cnnlab.data.augment import BatchAugmenter
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.models import create_model
from cnnlab.train.engine import make_engine
from cnnlab.train.loop import fit, resolve_device, train_one_epoch
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory

RESULTS = Path(__file__).parent / "results" / "augment_cost.json"
GOAL_SHARE = 0.15
EVERYTHING = AugmentConfig(crop_padding=2, flip=True, rotate=10.0, translate=0.1, scale=0.1, erase=0.5)


class TimedAugmenter:
    """Wraps a BatchAugmenter and adds up the seconds spent inside it."""

    def __init__(self, augmenter: BatchAugmenter, device: torch.device) -> None:
        self.augmenter, self.device, self.seconds = augmenter, device, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        started = time.perf_counter()
        y = self.augmenter(x)
        _sync(self.device)
        self.seconds += time.perf_counter() - started
        return y


def measure(
    device: str = "cpu", epochs: int = 3, batch_size: int = 128, augment: AugmentConfig = EVERYTHING, seed: int = 0
) -> dict:
    """Fastest epoch seconds with and without augmentation over `epochs` alternating pairs, and the shares."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    splits = load_splits("fashion-mnist", None, val_fraction=0.1, seed=seed)
    normalization = normalization_for(splits)
    train = splits.train.to(dev)
    config = TrainConfig(model="lenet5", dataset="fashion-mnist", batch_size=batch_size, seed=seed, augment=augment,
                         optim=OptimConfig(lr=0.02, schedule="constant"))  # fmt: skip
    engine = make_engine(create_model("lenet5", splits.image_shape, len(splits.classes)).to(dev), config)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).to(dev)
    quiet = Progress(bar=False, quiet=True)
    steps = -(-len(train) // batch_size)

    def epoch(augmenter) -> float:
        _sync(dev)
        started = time.perf_counter()
        train_one_epoch(engine, train, order, normalization, config, 0, steps, augmenter, quiet)
        _sync(dev)
        return time.perf_counter() - started

    epoch(None)  # warm-up: first-call allocations and kernel selection
    plain, augmented, inside = [], [], []
    for _ in range(epochs):
        plain.append(epoch(None))
        timed = TimedAugmenter(BatchAugmenter(augment, seed, dev), dev)
        augmented.append(epoch(timed))
        inside.append(timed.seconds)
    # The fastest of each: on a shared machine, noise only ever adds time.
    without, with_aug, aug_s = min(plain), min(augmented), min(inside)
    return {
        "dataset": "fashion-mnist",
        "model": "lenet5",
        "train_images": len(train),
        "batch_size": batch_size,
        "augment": vars(augment),
        "device": str(dev),
        "epoch_s_without": round(without, 3),
        "epoch_s_with": round(with_aug, 3),
        "augment_s_per_epoch": round(aug_s, 3),
        "share_end_to_end": round((with_aug - without) / with_aug, 4),
        "share_direct": round(aug_s / with_aug, 4),
        "goal_share": GOAL_SHARE,
        "epochs_timed": epochs,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def accuracy(device: str = "cpu", epochs: int = 20, augment: AugmentConfig = EVERYTHING, seed: int = 0) -> dict:
    """Test accuracy of LeNet-5 after `epochs` on Fashion-MNIST, without and with `augment`."""
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for label, config in (("without", AugmentConfig()), ("with", augment)):
            train_config = TrainConfig(model="lenet5", dataset="fashion-mnist", epochs=epochs, seed=seed, device=device,
                                       augment=replace(config))  # fmt: skip
            run = RunDirectory.create(Path(runs) / label, overwrite=True)
            result = fit(train_config, run, Progress(bar=False))
            results[f"test_accuracy_{label}"] = round(result.test.evaluation.accuracy, 4)
            results[f"train_seconds_{label}"] = round(sum(r["seconds"] for r in result.rows), 1)
    return {"epochs": epochs, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed pairs of epochs (the fastest of each is reported)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accuracy", action="store_true", help="also train 20 epochs with and without augmentation")
    args = parser.parse_args(argv)
    result = measure(args.device, args.epochs, args.batch_size)
    print(
        f"LeNet-5 epoch on {result['train_images']} Fashion-MNIST images ({result['device']}): "
        f"{result['epoch_s_without']:.2f} s without augmentation, {result['epoch_s_with']:.2f} s with; "
        f"augmentation {100 * result['share_end_to_end']:.1f}% of the epoch end to end, "
        f"{100 * result['share_direct']:.1f}% timed directly (goal < {100 * GOAL_SHARE:.0f}%)"
    )
    if args.accuracy:
        result["accuracy"] = accuracy(args.device)
        print(f"20 epochs: test accuracy {result['accuracy']}")
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")
    return 0 if result["share_direct"] < GOAL_SHARE else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
