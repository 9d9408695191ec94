"""Where oneDNN spends one slice's training step: the convolutions, and the layout reorders around them.

`cnnlab train` runs each slice of a batch on one thread (cnnlab/fast/slices.py).
This script times that step alone (`AutogradEngine.train_step` on `--batch-size`
images, one thread, `slices=1`), then runs it again under oneDNN's verbose mode,
which reports every primitive it executes with its problem and time, and sums
those per primitive kind, direction and shape.

The reorders are the part PyTorch adds: its tensors are plain NCHW, oneDNN's
convolution kernels work on channel blocks of 16 (8 for AVX2 kernels), so each
convolution's input, output or gradient is converted on the way in and out.
LeNet-5's first convolution, with 6 output channels, wrote blocks padded to 16
channels, 2.7x its real output; it now runs cnnlab's compiled loops
(cnnlab/fast/conv_pool.py) and no longer appears here.

    python bench/onednn_primitives.py [--batch-size 192] [--steps 20] [--quick] [--out PATH]

oneDNN writes its verbose lines to the process's stdout from C, so the timing
runs in a child process whose stdout this script reads.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict

import torch

from harness import alternate, bench_parser, bench_splits, default_dataset, results_path, write_results

STEP_MARK = "onednn_primitives: step ms "


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=192, help="images in the slice (the recipe's 384 / 2)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, and steps traced")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dataset, steps = args.dataset or default_dataset(), 3 if args.quick else args.steps
    if args.child:
        return child(args.batch_size, steps, dataset)

    command = [sys.executable, __file__, "--child", "--batch-size", str(args.batch_size), "--steps", str(steps),
               "--dataset", dataset]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = summarize(output.splitlines(), steps)
    result = {"batch_size": args.batch_size, "steps": steps, "dataset": dataset, "quick": args.quick, **result}
    write_results(results_path("onednn_primitives", args.quick, args.out), result)
    print(table(result))
    return 0


def child(batch_size: int, steps: int, dataset: str) -> int:
    """Time `steps` one-thread, one-slice steps, then trace `steps` more with oneDNN's verbose mode on."""
    from cnnlab.config import resolve_config
    from cnnlab.data.sources import normalization_for
    from cnnlab.engine.autograd import AutogradEngine
    from cnnlab.models import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = bench_splits(dataset, None, 1, 0)
    config = resolve_config({"dataset": dataset}, {"batch_size": batch_size})
    model = create_model("lenet5", splits.image_shape, len(splits.classes))
    engine = AutogradEngine(model, config, slices=1)  # one slice on one thread, as each core runs it in `cnnlab train`
    x = normalization_for(splits).apply(splits.train.images[:batch_size].clone())  # (B, C, H, W) float32
    y = splits.train.labels[:batch_size]  # (B,)

    def step() -> None:
        engine.train_step(x, y, 0.01)

    for _ in range(4):  # oneDNN creates its primitives on first use (alternate adds one more)
        step()
    seconds = alternate({"step": step}, steps)["step"]
    print(f"{STEP_MARK}{1e3 * statistics.median(seconds):.4f}", flush=True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        for _ in range(steps):
            step()
    return 0


def summarize(lines: list[str], steps: int) -> dict:
    """Milliseconds per step for each (primitive, direction, problem) in oneDNN's verbose `exec` lines."""
    step_ms = next(float(line[len(STEP_MARK) :]) for line in lines if line.startswith(STEP_MARK))
    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    for line in lines:
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields[:5]:
            continue
        at = fields.index("exec")
        # exec, engine, kind, implementation, direction, memory descriptors, attributes, auxiliary, problem, ms
        kind, implementation, direction, memory = fields[at + 2 : at + 6]
        if kind == "reorder":
            src, dst = (part.split(":")[4] for part in memory.split(" ")[:2])  # e.g. src:f32::blocked:abcd::f0
            direction = f"{src} -> {dst}"
        totals[(kind, f"{direction} ({implementation})", fields[-2])] += float(fields[-1])
    rows = [
        {"primitive": kind, "what": what, "problem": problem, "ms_per_step": round(ms / steps, 3),
         "share_of_step": round(ms / steps / step_ms, 3)}  # fmt: skip
        for (kind, what, problem), ms in sorted(totals.items(), key=lambda item: -item[1])
    ]
    return {"step_ms": step_ms, "onednn_ms_per_step": round(sum(r["ms_per_step"] for r in rows), 3), "rows": rows}


def table(result: dict) -> str:
    lines = [
        f"One slice's step: {result['batch_size']} images on one thread, {result['step_ms']:.2f} ms; "
        f"oneDNN primitives {result['onednn_ms_per_step']:.2f} ms of it.",
        "",
        "| primitive | direction (implementation) | problem | ms per step | share of the step |",
        "|---|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        if row["ms_per_step"] >= 0.01:
            lines.append(
                f"| {row['primitive']} | {row['what']} | {row['problem']} | {row['ms_per_step']:.2f} | "
                f"{100 * row['share_of_step']:.1f}% |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
