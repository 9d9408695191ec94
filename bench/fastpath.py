"""What cnnlab/train/fastpath.py buys: the training step, and the pool alone.

Times cnnlab's own training step (`AutogradEngine.train_step`, driven by the
loop's `train_one_epoch`, per-batch data handling included) on LeNet-5 with
Fashion-MNIST batches, four ways:

    eager              model(x) on the whole batch: PyTorch's max-pool and ReLU
    fast path          tiling max-pools fused with their ReLU in compiled loops
    fast path, sliced  the same, the batch split across the cores, one slice
                       each (cnnlab/train/slices.py): what `cnnlab train` runs
    one slice alone    one core's share of that (the batch / the number of
                       cores, on one thread) while the other cores idle: sliced
                       over this is what the cores add up to together

and, on the first pool's input (N, 6, 24, 24), ReLU + max-pool forward and
backward: torch's kernels against `cnnlab.backprop.tiled_maxpool`.

Each variant runs in its own process (see `ablation` for why); they take
turns, `--rounds` times, each timing `--steps` steps of the same batches from
the same starting weights; the median step of each turn, then the median over
turns, is reported, so a busy neighbour slows all of them alike.

    python bench/fastpath.py [--batch-sizes 256,512] [--rounds 7] [--steps 40]
    python bench/fastpath.py --profile   # where a fast-path step spends its time

--profile runs one slice of the fast path's step (the batch / the cores'
images on one thread, as each core runs it) under torch.profiler and groups
the operators' own CPU time by what they do (docs/performance.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits, normalization_for
from cnnlab.models import create_model
from cnnlab.train.engine import AutogradEngine
from cnnlab.train.fastpath import fast_forward
from cnnlab.train.loop import train_one_epoch
from cnnlab.train.progress import Progress
from measure import Turns
from run import run_in_turns

VARIANTS = ("eager", "fast path", "fast path, sliced", "one slice alone")
RESULTS = Path(__file__).parent / "results" / "fastpath.json"
PROFILE = Path(__file__).parent / "results" / "fastpath_profile.json"


class StepTimer(Progress):
    """The loop reports every batch here: the time between two reports is one step."""

    def __init__(self) -> None:
        super().__init__(bar=False, quiet=True)
        self.seconds: list[float] = []
        self.last = time.perf_counter()

    def batch_done(self, loss: float | None = None) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def ablation(batch_size: int, steps: int, rounds: int, dataset: str) -> list[dict]:
    """Median seconds per step of each variant, each in its own process, taking turns over `rounds`.

    One process per variant: after a sliced step, OpenMP stops spinning between parallel
    regions for the rest of the process (cnnlab/train/slices.py), which slows the
    whole-batch variants' two-thread operators; in one process they measured up to 40% slower.
    """
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
            "batch_size": result["batch_size"],
            "images_per_s": round(result["batch_size"] / step_s),
            "speedup_vs_eager": round(base * result["batch_size"] / batch_size / step_s, 2),
            "step_ms_each_round": [round(1e3 * s, 2) for s in result["step_s_each_round"]],
        })
    return rows


def time_variant(variant: str, batch_size: int, steps: int, rounds: int, dataset: str, turns: Turns) -> dict:
    """One variant's median step in each of `rounds` turns of `steps` steps (a child process of `ablation`)."""
    alone = variant == "one slice alone"
    cores = torch.get_num_threads()
    torch.manual_seed(0)  # every variant's process starts from the same weights
    splits = load_splits(dataset, None, 0.1, 0)
    normalization = normalization_for(splits)
    n = min(len(splits.train), batch_size * steps)
    train, order = splits.train.subset(torch.arange(n)), torch.arange(n)
    config = TrainConfig(batch_size=batch_size // cores if alone else batch_size,
                         optim=OptimConfig(lr=0.01, schedule="constant"))  # fmt: skip
    model = create_model("lenet5", splits.image_shape, len(splits.classes))
    engine = AutogradEngine(model, config)
    engine.forward = model if variant == "eager" else fast_forward(model)
    engine.slices = engine.slices if variant == "fast path, sliced" else 1
    if alone:
        torch.set_num_threads(1)
    train_one_epoch(engine, train, order, normalization, config, 0, steps, None, Progress(quiet=True))  # warm-up
    medians = []
    for _ in range(rounds):
        turns.take()
        timer = StepTimer()
        train_one_epoch(engine, train, order, normalization, config, 0, steps, None, timer)
        medians.append(statistics.median(timer.seconds))
    return {"variant": variant, "batch_size": config.batch_size, "step_s_each_round": medians}


# Name fragments of an operator or of any operator enclosing it -> what it does.
# The first fragment found anywhere in the chain wins, so the order matters.
GROUPS = (
    ("Optimizer.", "optimizer"),
    ("convolution_backward", "conv2 backward (oneDNN)"),
    ("mkldnn_convolution", "conv2 forward (oneDNN)"),
    ("WideConv2dBackward", "conv1 + ReLU + pool1 backward (compiled)"),
    ("WideConv2d", "conv1 + ReLU + pool1 forward (compiled)"),
    ("_TiledMaxPoolBackward", "pool2 + ReLU backward (compiled)"),
    ("_TiledMaxPool", "pool2 + ReLU forward (compiled)"),
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
OUTSIDE_STEP = "batch: gather, normalize, loop"


def _classify(event) -> str:
    chain, parent = [event.name], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    if "train_step" not in chain:
        return OUTSIDE_STEP
    for fragment, group in GROUPS:
        if any(fragment in name for name in chain):
            return group
    return "other (autograd engine, gradient accumulation, views)"


def profile(batch_size: int, steps: int, dataset: str) -> dict:
    """Self CPU time of one slice's fast-path training step, grouped; shares of the whole.

    The slice is what each core runs in `cnnlab train`: the batch / the cores' images, on
    one thread (the profiler's parent chain, "train_step", does not cross into the slices'
    worker threads, so the slice runs on the calling thread).
    """
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    splits = load_splits(dataset, None, 0.1, 0)
    normalization = normalization_for(splits)
    cores = torch.get_num_threads()
    slice_size = max(1, batch_size // cores)
    n = min(len(splits.train), slice_size * steps)
    train = splits.train.subset(torch.arange(n))
    config = TrainConfig(batch_size=slice_size, optim=OptimConfig(lr=0.01, schedule="constant"))
    engine = AutogradEngine(create_model("lenet5", splits.image_shape, len(splits.classes)), config)
    engine.slices = 1
    torch.set_num_threads(1)
    order, quiet = torch.arange(n), Progress(quiet=True)
    step = engine.train_step

    def labelled_step(x: torch.Tensor, y: torch.Tensor, lr: float):
        with record_function("train_step"):
            return step(x, y, lr)

    engine.train_step = labelled_step
    train_one_epoch(engine, train, order, normalization, config, 0, steps, None, quiet)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        train_one_epoch(engine, train, order, normalization, config, 0, steps, None, quiet)
        wall = time.perf_counter() - started
    groups: dict[str, float] = {}
    for event in prof.events():
        group = _classify(event)
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    shares = {g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])}
    for group, share in shares.items():
        print(f"{group:<28} {100 * share:5.1f}%")
    torch.set_num_threads(cores)
    print(f"{steps} steps of one slice ({slice_size} of a batch of {batch_size}, one thread): "
          f"{1e3 * wall / steps:.2f} ms per step (profiled)")  # fmt: skip
    return {"batch_size": batch_size, "slice_size": slice_size, "threads": 1, "steps": steps,
            "ms_per_step_profiled": round(1e3 * wall / steps, 2), "shares": shares}  # fmt: skip


def pool_kernels(batch_size: int, repeats: int = 200) -> dict:
    """Milliseconds for ReLU + 2x2 max-pool, forward and backward, on LeNet-5's first pool input."""
    import torch.nn.functional as F

    from cnnlab.backprop.tiled_maxpool import tiled_max_pool, tiled_max_pool_backward

    x = torch.randn(batch_size, 6, 24, 24)  # (N, C, H, W): conv1's output
    dout = torch.randn(batch_size, 6, 12, 12)
    leaf = x.clone().requires_grad_()

    def torch_forward():
        return F.max_pool2d(F.relu(leaf), 2)

    def torch_both():
        torch_forward().backward(dout)
        leaf.grad = None

    switch = tiled_max_pool(x, (2, 2), relu=True)[1]
    timings = {
        "torch forward": lambda: torch_forward(),
        "torch forward + backward": torch_both,
        "compiled forward": lambda: tiled_max_pool(x, (2, 2), relu=True),
        "compiled backward": lambda: tiled_max_pool_backward(dout, switch, (2, 2), x.shape),
    }
    result = {}
    for name, work in timings.items():
        work()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats // 5):
                work()
            samples.append((time.perf_counter() - started) / (repeats // 5))
        result[name] = round(1e3 * statistics.median(samples), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="256,512", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=384, help="for --profile (the Fashion-MNIST recipe's batch)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--profile", action="store_true", help="profile the full fast path instead")
    parser.add_argument("--results", type=Path, help=f"where the figures go (default {RESULTS.name} or "
                        f"{PROFILE.name} under bench/results)")  # fmt: skip
    # A child process of the ablation: one variant, at the first batch size, in turns.
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        batch_size = int(args.batch_sizes.split(",")[0])
        turns = Turns(args.turn_fds, [])
        timed = time_variant(args.variant, batch_size, args.steps, args.rounds, args.dataset, turns)
        args.out.write_text(json.dumps(timed) + "\n")
        return 0
    results_path = args.results or (PROFILE if args.profile else RESULTS)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        result = profile(args.batch_size, args.steps, args.dataset)
        results_path.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rows = ablation(batch_size, args.steps, args.rounds, args.dataset)
        for row in rows:
            print(f"batch {batch_size:>4}  {row['variant']:<18} {row['images_per_s']:>8,} img/s  "
                  f"x{row['speedup_vs_eager']}")  # fmt: skip
        rate = {row["variant"]: row["images_per_s"] for row in rows}
        cores_together = round(rate["fast path, sliced"] / rate["one slice alone"], 2)
        print(f"batch {batch_size:>4}  {torch.get_num_threads()} cores sliced = x{cores_together} one core's images/s")
        pool = pool_kernels(batch_size)
        print(f"batch {batch_size:>4}  ReLU + max-pool (ms): " + ", ".join(f"{k} {v}" for k, v in pool.items()))
        results.append({"batch_size": batch_size, "rows": rows, "relu_max_pool_ms": pool,
                        "sliced_over_one_slice_alone": cores_together})  # fmt: skip
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary = {
        "dataset": args.dataset,
        "rounds": args.rounds,
        "steps": args.steps,
        "results": results,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": load,
    }
    results_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
