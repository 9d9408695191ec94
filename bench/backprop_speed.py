"""How fast cnnlab's hand-written backprop trains, next to PyTorch's autograd.

Trains LeNet-5 with the manual engine and the autograd engine from the same
initial weights, on the same batches of 256 (Fashion-MNIST when it is
installed, the built-in digits otherwise), and reports training images per
second for each and their ratio:

    ratio = images/s (manual) / images/s (autograd)     goal >= 0.8, floor 0.5

Each repeat times `steps` steps of one engine, then of the other, alternating
which goes first; on a shared machine that exposes both to the same noise. The
ratio is the median of the per-repeat ratios; images/s are medians too. Only
train_step is timed: the batches are normalized beforehand.

It runs on one CPU thread unless told otherwise (`--threads N`, 0 for torch's
default). The engines call the same convolution kernels; what the ratio is
about is the work around them, and one thread measures that steadily. With
more threads on a CPU shared with other busy processes, every parallel
operation waits for its threads to be scheduled, both engines slow down many
times over, and the engine with more (smaller) operations loses most: the
figure then measures the scheduler.

    python bench/backprop_speed.py [--quick] [--device cpu] [--threads N] [--dataset NAME]

Writes bench/results/backprop_speed.json. `measure()` is importable.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cnnlab.atomicfile import atomic_write_text
from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import get_source, load_splits, normalization_for
from cnnlab.models import create_model
from cnnlab.train.engine import make_engine
from cnnlab.train.loop import resolve_device

RESULTS = Path(__file__).parent / "results" / "backprop_speed.json"
GOAL_RATIO = 0.8
FLOOR_RATIO = 0.5


def default_dataset() -> str:
    return "fashion-mnist" if get_source("fashion-mnist").find(None) is not None else "digits"


def measure(
    dataset: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    steps: int = 10,
    repeats: int = 9,
    model: str = "lenet5",
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    """Median training images/s of both engines over `repeats` alternating runs of `steps` steps each.

    threads: CPU threads for torch during the measurement (restored after); None or 0 keeps torch's setting.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(dataset or default_dataset(), device, batch_size, steps, repeats, model, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(dataset: str, device: str, batch_size: int, steps: int, repeats: int, model: str, seed: int) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(seed)
    splits = load_splits(dataset, None, val_fraction=0.1, seed=seed)
    normalization = normalization_for(splits)
    # The same `steps` batches for both engines, normalized up front: only train_step is timed.
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(steps):
        index = order[(i * batch_size) % len(order) :][:batch_size]
        batches.append((normalization.apply(splits.train.images[index]).to(dev), splits.train.labels[index].to(dev)))

    initial = create_model(model, splits.image_shape, len(splits.classes))
    engines = {}
    for name in ("manual", "autograd"):
        config = TrainConfig(model=model, dataset=dataset, batch_size=batch_size, engine=name,
                             optim=OptimConfig(lr=0.01, schedule="constant"))  # fmt: skip
        engines[name] = make_engine(copy.deepcopy(initial).to(dev).train(), config)

    def images_per_second(name: str) -> float:
        engine = engines[name]
        _sync(dev)
        started = time.perf_counter()
        for x, y in batches:
            engine.train_step(x, y, 0.01)
        _sync(dev)
        return steps * batch_size / (time.perf_counter() - started)

    for name in engines:  # warm-up: first-call allocations and kernel selection
        images_per_second(name)
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for repeat in range(repeats):
        for name in ("manual", "autograd") if repeat % 2 == 0 else ("autograd", "manual"):
            speeds[name].append(images_per_second(name))
    ratios = [m / a for m, a in zip(speeds["manual"], speeds["autograd"])]
    return {
        "model": model,
        "dataset": dataset,
        "device": str(dev),
        "batch_size": batch_size,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "manual_images_per_s": round(statistics.median(speeds["manual"]), 1),
        "autograd_images_per_s": round(statistics.median(speeds["autograd"]), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "goal_ratio": GOAL_RATIO,
        "floor_ratio": FLOOR_RATIO,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke test, noisier)")
    parser.add_argument("--dataset", help="default: fashion-mnist if installed, else digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1; 0: torch's choice)")
    args = parser.parse_args(argv)
    steps, repeats = (4, 3) if args.quick else (10, 9)
    result = measure(args.dataset, args.device, steps=steps, repeats=repeats, threads=args.threads)
    print(
        f"LeNet-5 training on {result['dataset']} ({result['device']}, batch {result['batch_size']}, "
        f"{result['cpu_threads']} threads): manual {result['manual_images_per_s']:.0f} images/s, "
        f"autograd {result['autograd_images_per_s']:.0f} images/s, "
        f"ratio {result['ratio']:.2f} (goal >= {GOAL_RATIO}, floor {FLOOR_RATIO})"
    )
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")
    return 0 if result["ratio"] >= FLOOR_RATIO else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
