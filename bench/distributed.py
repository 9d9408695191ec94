"""Data-parallel training on one CPU: 2 processes x 1 thread against 1 process x 2 threads.

Three ways to spend a machine's cores on `cnnlab train`, each a command of its own,
taking turns round after round (the order alternating, so that a busy neighbour slows
them alike):

    1x1            one process, one thread (OMP_NUM_THREADS=1): the baseline
    1x2 slices     one process, two threads: cnnlab's default, each core a slice of every batch
    2x1 --nproc 2  two processes of one thread each (torchrun, gloo), each a shard of every batch

Each figure is the training loop's images per second of the last epoch (the first one
warms up), from the run's metrics.csv, and the command's wall seconds (start-up, data,
validation, checkpoints and test included). Ratios are to 1x1 within the same round.

    python bench/distributed.py [--dataset fashion-mnist] [--epochs 2] [--rounds 2] [--out PATH]
    python bench/distributed.py --quick   # digits, one round: checks that it runs, figures mean nothing
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cnnlab.atomicfile import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {  # name -> (OMP_NUM_THREADS, the extra arguments to `cnnlab train`)
    "1x1": ("1", []),
    "1x2 slices": ("2", []),
    "2x1 --nproc 2": ("1", ["--nproc", "2"]),
}


def run_once(name: str, args: argparse.Namespace, runs: Path, round_index: int) -> dict[str, float]:
    """One contender's training run; its last epoch's images/s and the command's wall seconds."""
    threads, extra = CONTENDERS[name]
    run_name = f"{name.split()[0]}-{round_index}"
    command = [
        sys.executable, "-m", "cnnlab", "train", "--no-recipe", "--device", "cpu", "--dataset", args.dataset,
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--runs-dir", str(runs),
        "--name", run_name, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    with open(runs / run_name / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((runs / run_name / "summary.json").read_text())
    return {
        "images_per_s": float(rows[-1]["images_per_s"]),
        "wall_s": round(wall, 2),
        "test_accuracy": summary["test_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=256, help="256: two slices of 128 on one process")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--quick", action="store_true", help="digits, one round of 2 epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.rounds, args.epochs = "digits", 1, 2

    load_before = os.getloadavg()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            order = list(CONTENDERS) if index % 2 == 0 else list(reversed(CONTENDERS))
            figures = {name: run_once(name, args, Path(tmp), index) for name in order}
            base = figures["1x1"]["images_per_s"]
            for name, row in figures.items():
                row["ratio_to_1x1"] = round(row["images_per_s"] / base, 3)
                print(f"round {index + 1}: {name:14s} {row['images_per_s']:9.0f} img/s  x{row['ratio_to_1x1']:.2f}  "
                      f"wall {row['wall_s']:.1f}s", file=sys.stderr)  # fmt: skip
            rounds.append({name: figures[name] for name in CONTENDERS})

    results = {
        "command": "python " + " ".join(["bench/distributed.py", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "contenders": {
            name: {
                "omp_threads": CONTENDERS[name][0],
                "median_images_per_s": round(statistics.median(r[name]["images_per_s"] for r in rounds)),
                "median_ratio_to_1x1": round(statistics.median(r[name]["ratio_to_1x1"] for r in rounds), 3),
                "median_wall_s": round(statistics.median(r[name]["wall_s"] for r in rounds), 2),
            }
            for name in CONTENDERS
        },
        "rounds": rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)),
            # The machine is shared: its load says how much the figures are worth.
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
