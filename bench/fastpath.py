"""What cnnlab.fast buys a training step, option by option, and where a fast step spends its time.

Times the autograd engine's step (`engine.train_step` on a batch gathered and
normalized by `Normalization.apply`, as the training loop does) on LeNet-5,
four ways, each set through the engine's own options:

    eager              fast=False, slices=1: the model's own layers on the whole batch
    fast path          fast=True,  slices=1: the layers cnnlab.fast.plan has kernels for
                       run them (conv1 + ReLU + pool1, pool2 + ReLU in compiled loops)
    fast path, sliced  fast=True,  slices=None: the batch split across the cores, one
                       slice each (cnnlab/fast/slices.py): what `cnnlab train` runs
    one slice alone    fast=True,  slices=1, one core's share of the batch (the batch / the
                       number of cores) on one thread while the other cores idle: sliced
                       over this is what the cores add up to together

Each variant runs in its own process: after a sliced step, OpenMP stops
spinning between parallel regions for the rest of the process
(cnnlab/fast/slices.py), which slows the whole-batch variants' two-thread
operators (up to 40% in one process). They take turns (harness.run_in_turns),
`--rounds` times, each timing `--steps` steps of the same batches from the
same starting weights; the median step of each turn, then the median over
turns, is reported, so a busy neighbour slows all of them alike.

    python bench/fastpath.py [--batch-sizes 256,512] [--rounds 7] [--steps 40] [--quick]
    python bench/fastpath.py --profile   # where a fast-path step spends its time

--profile runs one slice of the fast path's step (the batch / the cores'
images on one thread, as each core runs it) under torch.profiler and groups
the operators' own CPU time by what they do (docs/performance.md quotes it).
The compiled kernels alone, against PyTorch's operators: bench/kernels.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.engine import make_engine
from cnnlab.models import create_model
from harness import (
    Turns, alternate, bench_parser, default_dataset, results_path, run_in_turns, write_json, write_results,
)

# variant -> the engine's options
VARIANTS = {
    "eager": {"fast": False, "slices": 1},
    "fast path": {"fast": True, "slices": 1},
    "fast path, sliced": {"fast": True, "slices": None},
    "one slice alone": {"fast": True, "slices": 1},
}
LR = 0.01


def ablation(batch_size: int, steps: int, rounds: int, dataset: str) -> list[dict]:
    """Each variant's images/s and speed-up over eager, each in its own process, taking turns over `rounds`."""
    with tempfile.TemporaryDirectory() as scratch:
        arguments = ["--batch-sizes", str(batch_size), "--steps", str(steps), "--rounds", str(rounds),
                     "--dataset", dataset]  # fmt: skip
        jobs = {
            variant: ("fastpath.py", ["--variant", variant, *arguments], Path(scratch) / f"{number}.json")
            for number, variant in enumerate(VARIANTS)
        }
        timed = run_in_turns(jobs)
    failed = [f"{variant}: {result['error']}" for variant, result in timed.items() if "error" in result]
    if failed:
        raise RuntimeError("; ".join(failed))
    rows, base = [], statistics.median(timed["eager"]["step_s_each_round"])
    for variant in VARIANTS:
        result = timed[variant]
        step_s = statistics.median(result["step_s_each_round"])
        rows.append({
            "variant": variant,
            "options": VARIANTS[variant],
            "batch_size": result["batch_size"],
            "images_per_s": round(result["batch_size"] / step_s),
            "speedup_vs_eager": round(base * result["batch_size"] / batch_size / step_s, 2),
            "step_ms_each_round": [round(1e3 * s, 2) for s in result["step_s_each_round"]],
        })  # fmt: skip
    return rows


def time_variant(variant: str, batch_size: int, steps: int, rounds: int, dataset: str, turns: Turns) -> dict:
    """One variant's median step in each of `rounds` turns of `steps` steps (a child process of `ablation`)."""
    if variant == "one slice alone":
        batch_size //= torch.get_num_threads()
        torch.set_num_threads(1)
    step = training_step(variant, batch_size, steps, dataset)
    medians = []
    for _ in range(rounds):
        turns.take()
        medians.append(statistics.median(alternate({variant: step}, steps)[variant]))
    return {"variant": variant, "batch_size": batch_size, "step_s_each_round": medians}


def training_step(variant: str, batch_size: int, steps: int, dataset: str, label: str | None = None):
    """A function that runs the next of `steps` training steps of `variant` (round and round), as the
    training loop runs one: gather and normalize the batch, then `engine.train_step`; inside a
    profiler range named `label` when given."""
    torch.manual_seed(0)  # every variant's process starts from the same weights
    splits = load_splits(dataset, None, 0.1, 0)
    normalization = normalization_for(splits)
    images, labels = splits.train.images, splits.train.labels  # (N, C, H, W) uint8, (N,) int64
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    indices = order.repeat(-(-steps * batch_size // len(order)))[: steps * batch_size].view(steps, batch_size)
    config = TrainConfig(batch_size=batch_size, optim=OptimConfig(lr=LR, schedule="constant"))
    engine = make_engine(create_model("lenet5", splits.image_shape, len(splits.classes)), config, **VARIANTS[variant])
    done = 0

    def step() -> None:
        nonlocal done
        index = indices[done % steps]
        done += 1
        x = normalization.apply(images, index)  # (B, C, H, W) float32
        if label is None:
            engine.train_step(x, labels[index], LR)
            return
        with record_function(label):
            engine.train_step(x, labels[index], LR)

    return step


# Name fragments of an operator or of any operator enclosing it -> what it does.
# The first fragment found anywhere in the chain wins, so the order matters.
GROUPS = (
    ("Optimizer.", "optimizer"),
    ("convolution_backward", "conv2 backward (oneDNN)"),
    ("mkldnn_convolution", "conv2 forward (oneDNN)"),
    ("ConvPool2dBackward", "conv1 + ReLU + pool1 backward (compiled)"),
    ("ConvPool2d", "conv1 + ReLU + pool1 forward (compiled)"),
    ("TiledMaxPool2dBackward", "pool2 + ReLU backward (compiled)"),
    ("TiledMaxPool2d", "pool2 + ReLU forward (compiled)"),
    ("threshold_backward", "ReLU"),
    ("relu", "ReLU"),
    ("addmm", "linear"),
    ("Addmm", "linear"),
    ("aten::mm", "linear"),
    ("cross_entropy", "loss"),
    ("LogSoftmax", "loss"),
    ("NllLoss", "loss"),
    ("linalg_vector_norm", "gradient clipping"),
    ("aten::stack", "gradient clipping"),
    ("aten::clamp", "gradient clipping"),
    ("aten::mul_", "gradient clipping"),
)
STEP = "train_step"
OUTSIDE_STEP = "batch: gather, normalize, loop"


def _classify(event) -> str:
    chain, parent = [event.name], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    if STEP not in chain:
        return OUTSIDE_STEP
    for fragment, group in GROUPS:
        if any(fragment in name for name in chain):
            return group
    return "other (autograd engine, gradient accumulation, views)"


def profile(batch_size: int, steps: int, dataset: str) -> dict:
    """Self CPU time of one slice's fast-path training step, grouped; shares of the whole.

    The slice is what each core runs in `cnnlab train`: the batch / the cores' images, on
    one thread (the profiler's parent chain, "train_step", does not cross into the slices'
    worker threads, so the slice runs on the calling thread: slices=1).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cores = torch.get_num_threads()
    slice_size = max(1, batch_size // cores)
    torch.set_num_threads(1)
    step = training_step("fast path", slice_size, steps, dataset, label=STEP)
    for _ in range(steps):  # warm-up
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - started
    torch.set_num_threads(cores)
    groups: dict[str, float] = {}
    for event in prof.events():
        group = _classify(event)
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    shares = {g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])}
    for group, share in shares.items():
        print(f"{group:<52} {100 * share:5.1f}%")
    print(f"{steps} steps of one slice ({slice_size} of a batch of {batch_size}, one thread): "
          f"{1e3 * wall / steps:.2f} ms per step (profiled)")  # fmt: skip
    return {"batch_size": batch_size, "slice_size": slice_size, "threads": 1, "steps": steps,
            "ms_per_step_profiled": round(1e3 * wall / steps, 2), "shares": shares}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="256,512", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=384, help="for --profile (the Fashion-MNIST recipe's batch)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    parser.add_argument("--profile", action="store_true", help="profile one slice of the fast path instead")
    # A child process of the ablation: one variant, at the first batch size, in turns.
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dataset = args.dataset or default_dataset()
    if args.quick:
        args.batch_sizes, args.rounds, args.steps = "128", 2, 3
    if args.variant:
        batch_size = int(args.batch_sizes.split(",")[0])
        timed = time_variant(args.variant, batch_size, args.steps, args.rounds, dataset, Turns(args.turn_fds, []))
        write_json(args.out, timed)
        return 0
    if args.profile:
        result = profile(args.batch_size, args.steps, dataset)
        write_results(results_path("fastpath_profile", args.quick, args.out), {"dataset": dataset, **result})
        return 0

    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rows = ablation(batch_size, args.steps, args.rounds, dataset)
        for row in rows:
            print(f"batch {batch_size:>4}  {row['variant']:<18} {row['images_per_s']:>8,} img/s  "
                  f"x{row['speedup_vs_eager']}")  # fmt: skip
        rate = {row["variant"]: row["images_per_s"] for row in rows}
        cores_together = round(rate["fast path, sliced"] / rate["one slice alone"], 2)
        print(f"batch {batch_size:>4}  {torch.get_num_threads()} cores sliced = x{cores_together} one core's images/s")
        results.append({"batch_size": batch_size, "rows": rows, "sliced_over_one_slice_alone": cores_together})
    figures = {"dataset": dataset, "quick": args.quick, "rounds": args.rounds, "steps": args.steps, "results": results}
    write_results(results_path("fastpath", args.quick, args.out), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
