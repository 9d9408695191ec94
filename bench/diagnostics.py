"""What training diagnostics cost: a measured step against a plain one, taking turns, on LeNet-5 and Fashion-MNIST.

    python bench/diagnostics.py [--engine autograd|manual] [--steps 40]

Diagnostics measure one step an epoch (cnnlab/train/diagnostics.py), so their cost per epoch is
(measured step - plain step) / (steps an epoch x plain step); this prints both medians and that share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cnnlab.config import resolve_config
from cnnlab.data.sources import load_splits
from cnnlab.train.loop import prepare
from cnnlab.train.progress import Progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="autograd", choices=("autograd", "manual"))
    parser.add_argument("--steps", type=int, default=40, help="steps of each kind")
    args = parser.parse_args()
    config = resolve_config({"model": "lenet5", "dataset": "fashion-mnist", "engine": args.engine, "device": "cpu"}, {})
    splits = load_splits(config.dataset, None, config.val_fraction, config.seed)
    setup = prepare(config, splits=splits, device=torch.device("cpu"), progress=Progress(quiet=True), resume=None)
    kinds = {"plain": setup.engine.train_step, "measured": setup.diagnostics.measured_step}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    order = torch.randperm(len(setup.data), generator=setup.shuffle)
    for i in range(2 * args.steps + 2):
        kind = ("plain", "measured")[i % 2]  # turns, so that a drift in the machine's speed hits both
        index = order[(i * config.batch_size) % (len(order) - config.batch_size) :][: config.batch_size]
        x, y = setup.normalization.apply(setup.data.images, index), setup.data.labels[index]
        started = time.perf_counter()
        kinds[kind](x, y, 0.01)
        if i >= 2:  # the first of each kind warms up
            times[kind].append(time.perf_counter() - started)
    plain, measured = statistics.median(times["plain"]), statistics.median(times["measured"])
    share = (measured - plain) / (setup.steps_per_epoch * plain)
    print(f"{args.engine} engine, batch {config.batch_size}, {setup.steps_per_epoch} steps an epoch: "
          f"plain step {1000 * plain:.2f} ms, measured step {1000 * measured:.2f} ms (x{measured / plain:.2f}); "
          f"diagnostics add {100 * share:.2f}% to an epoch")  # fmt: skip


if __name__ == "__main__":
    main()
