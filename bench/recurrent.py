"""How fast the hand-written BPTT trains the row-by-row RNN and LSTM, next to the autograd engine.

For `rnn` and `lstm`, trains from the same initial weights on the same batches
of 128 (Fashion-MNIST where it is installed, the built-in digits otherwise)
with `make_engine`'s defaults, autograd (torch's nn.RNN / nn.LSTM kernels, oneDNN's
fused LSTM on a CPU) and manual (cnnlab.backprop.recurrent), and reports

    ratio = images/s (manual) / images/s (autograd)

The four engines take turns in one process (harness.alternate), `steps` steps
each, round after round in alternating order; figures are medians over the
rounds, a ratio the median of the rounds' ratios. Only `train_step` is timed:
the batches are gathered and normalized beforehand. As a user gets them, each
batch is split into one slice per core (cnnlab.fast.slices).

    python bench/recurrent.py [--quick] [--dataset NAME] [--out PATH] [--docs PATH]

Writes bench/results/recurrent.json and, unless --quick, the table into the
generated section of docs/backprop.md.
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
BEGIN, END = "<!-- bench:recurrent:begin (written by bench/recurrent.py) -->", "<!-- bench:recurrent:end -->"
MODELS = ("rnn", "lstm")
ENGINES = ("autograd", "manual")
BATCH_SIZE = 128
LR = 1e-3


def measure(dataset: str, steps: int, rounds: int, seed: int = 0) -> dict:
    """Median training images/s of each model and engine over `rounds` alternating rounds of `steps` steps."""
    torch.manual_seed(seed)
    splits = load_splits(dataset, None, val_fraction=0.1, seed=seed)
    batches = train_batches(splits.train, normalization_for(splits), BATCH_SIZE, steps, seed)
    engines = {}
    for model in MODELS:
        initial = create_model(model, splits.image_shape, len(splits.classes))
        for engine in ENGINES:
            config = TrainConfig(model=model, dataset=dataset, batch_size=BATCH_SIZE, engine=engine,
                                 optim=OptimConfig(name="adam", lr=LR, schedule="constant"))  # fmt: skip
            engines[(model, engine)] = make_engine(copy.deepcopy(initial).train(), config)

    def steps_of(engine):
        def run() -> None:
            for x, y in batches:  # x: (128, C, H, W) float32 normalized, y: (128,) int64
                engine.train_step(x, y, LR)

        return run

    seconds = alternate({key: steps_of(engine) for key, engine in engines.items()}, rounds)
    rows = []
    for model, engine in engines:
        ratios = [a / s for s, a in zip(seconds[(model, engine)], seconds[(model, "autograd")])]
        rows.append({
            "model": model,
            "engine": engine,
            "ms_per_step": round(1e3 * statistics.median(seconds[(model, engine)]) / steps, 2),
            "images_per_s": round(steps * BATCH_SIZE / statistics.median(seconds[(model, engine)]), 1),
            "ratio_to_autograd": round(statistics.median(ratios), 3),
            "ratio_each_round": [round(r, 3) for r in ratios],
        })  # fmt: skip
    slices = engines[("lstm", "manual")].step.slices
    return {"dataset": dataset, "batch_size": BATCH_SIZE, "threads": torch.get_num_threads(), "slices": slices,
            "steps_per_round": steps, "rounds": rounds, "rows": rows}  # fmt: skip


def markdown(results: dict) -> str:
    """The generated part of docs/backprop.md's BPTT section."""
    machine = results["machine"]
    lines = [
        f"`rnn` and `lstm` on {results['dataset']}, batch {results['batch_size']}, Adam, {results['threads']} "
        f"threads (up to {results['slices']} slices); one process, "
        f"the four alternating; medians of {results['rounds']} x {results['steps_per_round']} steps. "
        f"{machine['cpu']}, torch {machine['torch']}, load average {results['load_average']}, {results['date']}."
        + (" Quick mode: figures are not meaningful." if results["quick"] else ""),
        f"Command: `{results['command']}`.",
        "",
        "| model | engine | ms per step | images/s | speed (autograd engine = x1) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| `{row['model']}` | {row['engine']} | {row['ms_per_step']:.2f} | {row['images_per_s']:,.0f} | "
                     f"x{row['ratio_to_autograd']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    docs_table_bench(argv, description=__doc__.splitlines()[0], name="recurrent", measure=measure,
                     markdown=markdown, sizes=((2, 3), (5, 9)), docs=DOCS, markers=(BEGIN, END))  # fmt: skip
    return 0

if __name__ == "__main__":
    sys.exit(main())
