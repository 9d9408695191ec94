"""Contenders (c) and (d): `cnnlab train` with its default recipe, through the package API.

Calls `cnnlab.train.loop.fit` with the config `cnnlab train --dataset
fashion-mnist --device cpu` resolves (defaults, then the tuned recipe for
LeNet-5 on the dataset; only the dataset, device, seed and run folder are
set), exactly what that command runs, including its per-epoch validation and
checkpoints. The bench watches through the `Progress` that fit reports to:
the clock starts when fit announces the training (data and model ready), and
after each epoch the bench pauses it, tests the epoch's checkpoint, and
resumes. `--engine manual` runs cnnlab's hand-written backprop instead (d).

    python bench/cnnlab_train.py --out result.json [--engine manual] [--budget 300]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from cnnlab.config import ENGINES, resolve_config
from cnnlab.data.dataset import ImageDataset
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.evaluate import evaluate
from cnnlab.train.loop import fit
from cnnlab.train.progress import Progress
from cnnlab.train.rundir import RunDirectory
from harness import Clock, Record, Turns, bench_splits, contender_parser


class BudgetSpent(Exception):
    """Raised from an epoch's end to stop fit once the bench's budget is spent."""


class BenchProgress(Progress):
    def __init__(self, run: RunDirectory, test: ImageDataset, record: Record, budget_s: float, turns: Turns) -> None:
        super().__init__(bar=False, quiet=True)
        self.run, self.test, self.record, self.budget_s, self.turns = run, test, record, budget_s, turns
        self.clock: Clock | None = None

    def message(self, text: str) -> None:
        if self.clock is None:  # fit's first message comes just before the first epoch
            self.turns.take()
            self.clock = Clock(self.budget_s)

    def end_epoch(self, row: dict[str, float], epochs: int) -> None:
        assert self.clock is not None
        elapsed = self.clock.elapsed()
        with self.clock.stopped():
            checkpoint = load_checkpoint(self.run.checkpoints / "last.pt")
            accuracy = evaluate(checkpoint.build_model(), self.test, checkpoint.normalization).accuracy
            self.record.add_epoch(row["epoch"], elapsed, row["seconds"], self.record.train_images, accuracy)
            print(f"{self.record.name}: epoch {int(row['epoch'])}  test {100 * accuracy:.2f}%", file=sys.stderr)
            self.turns.take()
        if self.clock.spent() and row["epoch"] < epochs:
            self.record.stopped_by_budget = True
            raise BudgetSpent


def main(argv: list[str] | None = None) -> int:
    parser = contender_parser(__doc__.splitlines()[0], None, "default: cnnlab's")
    parser.add_argument("--engine", choices=ENGINES, default="autograd")
    args = parser.parse_args(argv)

    splits = bench_splits(args.dataset, args.train_limit, args.test_limit, args.seed)
    # fit reads the data itself; keeping only the test split here leaves the peak memory fit's own.
    source, test, train_images = splits.name, splits.test, len(splits.train)
    del splits
    given = {"dataset": args.dataset, "device": "cpu", "seed": args.seed, "engine": args.engine}
    config = resolve_config(given, {"epochs": args.epochs} if args.epochs else {})
    config.dataset = source  # the recipe is the dataset's; its images come through the bench's source
    config.validate()
    optim = config.optim
    name = "cnnlab train" if args.engine == "autograd" else "cnnlab --engine manual"
    record = Record(name, f"default recipe: batch {config.batch_size}, {optim.name} lr {optim.lr} {optim.schedule}, "
                    f"{config.epochs} epochs, {args.engine} engine", config.batch_size, train_images, args.seed)  # fmt: skip
    with tempfile.TemporaryDirectory() as runs:
        config.runs_dir = runs
        run = RunDirectory.create(Path(runs) / "bench", overwrite=False)
        progress = BenchProgress(run, test, record, args.budget, Turns(args.turn_fds, record.turns))
        try:
            result = fit(config, run, progress)
            record.final_test_accuracy = round(result.test.evaluation.accuracy, 4)
        except BudgetSpent:
            record.final_test_accuracy = record.epochs[-1]["test_accuracy"]
            record.notes.append(f"stopped by the {args.budget:.0f} s budget after epoch {record.epochs[-1]['epoch']}")
    record.notes.append(f"torch threads {torch.get_num_threads()}")
    record.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
