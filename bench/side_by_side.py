"""c/b with the host's drift taken out: (b)'s and (c)'s training steps taking turns in one process.

bench/run.py runs each contender in its own process, minutes apart; on a shared
machine the rates drift by 20-30% between those minutes, and c/b with them.
Here both steps train on the same data in one process, in alternating blocks
of `--steps` steps, `--rounds` times (which goes first is drawn per round).
Each block's median step gives images per second; each round gives one ratio;
the median ratio over the rounds is reported with its range.

    (b)  plain_loop.py's step: a slice of the normalized float32 training tensor,
         model(x), cross-entropy, backward, SGD (Nesterov), OneCycleLR; batch 256
    (c)  cnnlab's step as `cnnlab train --dataset D` runs it: `train_one_epoch`
         with the resolved configuration (the recipe's batch, augmentation, loss
         and weight average), the batch gather and normalization included

    python bench/side_by_side.py --out result.json [--dataset fashion-mnist] [--rounds 9] [--steps 40]
                                 [--batch-size N]  # (c) at another batch
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import plain_loop
from cnnlab.config import resolve_config
from cnnlab.data.sources import normalization_for
from cnnlab.models import create_model
from cnnlab.train.averaging import WeightAverage
from cnnlab.train.engine import AutogradEngine
from cnnlab.train.loop import make_augmenter, train_one_epoch
from fastpath import StepTimer
from measure import bench_splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per contender and round")
    parser.add_argument("--batch-size", type=int, help="(c)'s batch instead of its recipe's; (b) keeps 256")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    splits = bench_splits(args.dataset, args.train_limit, 1, 0)
    config = resolve_config({"dataset": args.dataset}, {"batch_size": args.batch_size} if args.batch_size else {})
    steps = {"b": plain_steps(splits, args.steps), "c": cnnlab_steps(splits, config, args.steps)}
    batch = {"b": plain_loop.BATCH_SIZE, "c": config.batch_size}
    for name in steps:  # warm-up: compilation, allocator, oneDNN's primitive caches
        steps[name]()
    rates: dict[str, list[float]] = {"b": [], "c": []}
    for _ in range(args.rounds):
        for name in random.sample(sorted(steps), 2):
            rates[name].append(batch[name] / statistics.median(steps[name]()))
    ratios = [c / b for b, c in zip(rates["b"], rates["c"])]
    result = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch_size": batch,
        "images_per_s": {name: round(statistics.median(r)) for name, r in rates.items()},
        "c_over_b": round(statistics.median(ratios), 2),
        "c_over_b_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "c_over_b_each_round": [round(r, 3) for r in ratios],
        "torch_threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"side by side: b {result['images_per_s']['b']:,} img/s, c {result['images_per_s']['c']:,} img/s, "
          f"c/b x{result['c_over_b']} (rounds x{min(ratios):.2f}-x{max(ratios):.2f})", file=sys.stderr)  # fmt: skip
    return 0


def plain_steps(splits, steps: int):
    """A function that runs `steps` of (b)'s steps and returns each one's seconds."""
    x_train, _ = plain_loop.normalized(splits)
    y_train = splits.train.labels
    model = create_model("lenet5", splits.image_shape, len(splits.classes))
    optimizer, scheduler = plain_loop.sgd_one_cycle(model, total_steps=10**6)
    batch = plain_loop.BATCH_SIZE

    def run() -> list[float]:
        seconds = []
        order = torch.randperm(len(x_train))
        for i in range(steps):
            index = order[(i * batch) % len(x_train) :][:batch]
            started = time.perf_counter()
            plain_loop.step(model, optimizer, scheduler, x_train[index], y_train[index])
            seconds.append(time.perf_counter() - started)
        return seconds

    return run


def cnnlab_steps(splits, config, steps: int):
    """A function that runs `steps` of (c)'s steps through cnnlab's loop and returns each one's seconds."""
    normalization = normalization_for(splits)
    model = create_model(config.model, splits.image_shape, len(splits.classes))
    engine = AutogradEngine(model, config)
    augmenter = make_augmenter(config, torch.device("cpu"))
    average = WeightAverage(model, config.ema) if config.ema else None
    n = min(len(splits.train), config.batch_size * steps)
    train = splits.train.subset(torch.arange(n))

    def run() -> list[float]:
        timer = StepTimer()
        order = torch.randperm(n)
        train_one_epoch(engine, train, order, normalization, config, 0, 10**6, augmenter, timer, average)
        return timer.seconds

    return run


if __name__ == "__main__":
    sys.exit(main())
