"""How fast cnnlab's hand-written engine trains, next to the autograd engine, as a user gets them.

Trains LeNet-5 from the same initial weights on the same batches of 256
(Fashion-MNIST where it is installed, the built-in digits otherwise) with

    autograd           `make_engine` with its defaults: fast kernels on, sliced one slice per core
    manual             the hand-written engine (`--engine manual`), the same defaults
    manual, fast=False the hand-written engine on its plain layers (no compiled kernels)

and reports training images per second for each and their ratio to the autograd engine's:

    ratio = images/s (manual) / images/s (autograd)     goal >= 0.8, floor 0.5

The engines take turns in one process (harness.alternate), `steps` steps each,
round after round in alternating order; images/s are medians over the rounds,
a ratio the median of the rounds' ratios. Only `train_step` is timed: the
batches are gathered and normalized beforehand.

    python bench/engines.py [--quick] [--dataset NAME] [--out PATH] [--docs PATH]

Writes bench/results/engines.json and, unless --quick, the table into the
generated section of docs/backprop.md. Exits 1 when the ratio is under the floor.
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.engine import make_engine
from cnnlab.models import create_model
from harness import ROOT, alternate, docs_table_bench, train_batches

DOCS = ROOT / "docs" / "backprop.md"
BEGIN, END = "<!-- bench:engines:begin (written by bench/engines.py) -->", "<!-- bench:engines:end -->"
GOAL_RATIO = 0.8
FLOOR_RATIO = 0.5
BATCH_SIZE = 256
LR = 0.01
# name -> (config.engine, make_engine's options, the docs' label)
ENGINES = {
    "autograd": ("autograd", {}, "autograd (`--engine autograd`)"),
    "manual": ("manual", {}, "hand-written (`--engine manual`)"),
    "manual, fast=False": ("manual", {"fast": False}, "hand-written, `fast=False`"),
}


def measure(dataset: str, steps: int, rounds: int, seed: int = 0) -> dict:
    """Median training images/s of each engine over `rounds` alternating rounds of `steps` steps each."""
    torch.manual_seed(seed)
    splits = load_splits(dataset, None, val_fraction=0.1, seed=seed)
    batches = train_batches(splits.train, normalization_for(splits), BATCH_SIZE, steps, seed)
    initial = create_model("lenet5", splits.image_shape, len(splits.classes))
    engines = {}
    for name, (kind, options, _) in ENGINES.items():
        config = TrainConfig(model="lenet5", dataset=dataset, batch_size=BATCH_SIZE, engine=kind,
                             optim=OptimConfig(lr=LR, schedule="constant"))  # fmt: skip
        engines[name] = make_engine(copy.deepcopy(initial).train(), config, **options)

    def steps_of(engine):
        def run() -> None:
            for x, y in batches:  # x: (256, C, H, W) float32 normalized, y: (256,) int64
                engine.train_step(x, y, LR)

        return run

    seconds = alternate({name: steps_of(engine) for name, engine in engines.items()}, rounds)
    rows = []
    for name, (_, options, _) in ENGINES.items():
        ratios = [a / s for s, a in zip(seconds[name], seconds["autograd"])]  # images/s over autograd's
        rows.append({
            "engine": name,
            "options": {"fast": options.get("fast", True), "slices": engines[name].step.slices},
            "ms_per_step": round(1e3 * statistics.median(seconds[name]) / steps, 2),
            "images_per_s": round(steps * BATCH_SIZE / statistics.median(seconds[name]), 1),
            "ratio_to_autograd": round(statistics.median(ratios), 3),
            "ratio_each_round": [round(r, 3) for r in ratios],
        })  # fmt: skip
    return {
        "model": "lenet5",
        "dataset": dataset,
        "batch_size": BATCH_SIZE,
        "steps_per_round": steps,
        "rounds": rounds,
        "engines": rows,
        "ratio": rows[1]["ratio_to_autograd"],
        "goal_ratio": GOAL_RATIO,
        "floor_ratio": FLOOR_RATIO,
    }


def markdown(results: dict) -> str:
    """The generated part of docs/backprop.md's speed section."""
    machine, slices = results["machine"], results["engines"][0]["options"]["slices"]
    lines = [
        f"LeNet-5 on {results['dataset']}, batch {results['batch_size']}, {machine['logical_cpus']} cores "
        f"({slices} slices); one process, the engines alternating; medians of {results['rounds']} x "
        f"{results['steps_per_round']} steps. {machine['cpu']}, torch {machine['torch']}, {results['date']}."
        + (" Quick mode: figures are not meaningful." if results["quick"] else ""),
        f"Command: `{results['command']}`.",
        "",
        "| engine | ms per step | images/s | speed (autograd engine = x1) |",
        "|---|---:|---:|---:|",
    ]
    for row in results["engines"]:
        lines.append(f"| {ENGINES[row['engine']][2]} | {row['ms_per_step']:.2f} | {row['images_per_s']:,.0f} | "
                     f"x{row['ratio_to_autograd']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    results = docs_table_bench(argv, description=__doc__.splitlines()[0], name="engines", measure=measure,
                               markdown=markdown, sizes=((3, 3), (10, 15)), docs=DOCS, markers=(BEGIN, END))  # fmt: skip
    return 0 if results["quick"] or results["ratio"] >= FLOOR_RATIO else 1

if __name__ == "__main__":
    sys.exit(main())
