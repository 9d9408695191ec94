"""cnnlab's compiled kernels against PyTorch's own operators, at the shapes the docs quote.

One process, one thread (what each slice of a sliced step runs on), each
kernel and its PyTorch counterpart taking turns round after round
(harness.alternate); the median of the rounds is reported:

    pool1 + ReLU       LeNet-5's first pool, 192 images x 6 x 24 x 24:
                       `tiled_max_pool` / `tiled_max_pool_backward` against
                       F.max_pool2d(F.relu(x), 2) as training runs it (recording
                       for autograd) and its backward
    conv1 + ReLU + pool1
                       192 images, 1 -> 6 channels, 5x5, 28x28, pool 2x2:
                       `conv_pool` / `conv_pool_weight_grad` against
                       max_pool2d(relu(conv2d(x))) and the weight and bias
                       gradients autograd computes for it
    batch preparation  384 images gathered from the training set and normalized:
                       `Normalization.apply(images, index)` against
                       images[index].float() * scale - shift in PyTorch operators

    python bench/kernels.py [--quick] [--out PATH]

Writes bench/results/kernels.json and prints the table.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnlab.data.dataset import Normalization
from cnnlab.fast.conv_pool import conv_pool, conv_pool_weight_grad
from cnnlab.fast.tiled_maxpool import tiled_max_pool, tiled_max_pool_backward
from harness import alternate, bench_parser, one_thread, results_path, write_results

SLICE = 192  # one slice of the Fashion-MNIST recipe's batch of 384 on two cores
BATCH = 384
POOL = (2, 2)
NO_PADDING = (0, 0)


def pool_kernels() -> dict[str, dict[str, Callable[[], object]]]:
    """ReLU + 2x2 max-pool on conv1's output (N, 6, 24, 24), forward and backward."""
    x = torch.randn(SLICE, 6, 24, 24)
    dout = torch.randn(SLICE, 6, 12, 12)  # the pooled output's gradient
    _, switch = tiled_max_pool(x, POOL, relu=True)
    leaf = x.clone().requires_grad_()
    y = F.max_pool2d(F.relu(leaf), 2)  # kept, with its graph, for the backward timings
    return {
        "pool1 + ReLU forward": {
            "cnnlab": lambda: tiled_max_pool(x, POOL, relu=True),
            "torch": lambda: F.max_pool2d(F.relu(leaf), 2),  # as in training: recording for backward
        },
        "pool1 + ReLU backward": {
            "cnnlab": lambda: tiled_max_pool_backward(dout, switch, POOL, x.shape),
            "torch": lambda: torch.autograd.grad(y, leaf, dout, retain_graph=True),
        },
    }


def conv_pool_kernels() -> dict[str, dict[str, Callable[[], object]]]:
    """LeNet-5's conv1 (1 -> 6 channels, 5x5) + ReLU + 2x2 pool on (N, 1, 28, 28), forward and backward.

    Backward is the weight and bias gradients only: the first layer's input needs none.
    """
    x = torch.randn(SLICE, 1, 28, 28)
    weight, bias = torch.randn(6, 1, 5, 5) * 0.2, torch.randn(6) * 0.1
    dy = torch.randn(SLICE, 6, 12, 12)
    _, switch = conv_pool(x, weight, bias, NO_PADDING, POOL, relu=True)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()

    def torch_forward() -> torch.Tensor:
        return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)

    y = torch_forward()
    return {
        "conv1 + ReLU + pool1 forward": {
            "cnnlab": lambda: conv_pool(x, weight, bias, NO_PADDING, POOL, relu=True),
            "torch": lambda: torch_forward().detach(),
        },
        "conv1 + ReLU + pool1 backward": {
            "cnnlab": lambda: conv_pool_weight_grad(x, dy, switch, weight.shape, NO_PADDING, POOL),
            "torch": lambda: torch.autograd.grad(y, (w, b), dy, retain_graph=True),
        },
    }


def batch_kernels() -> dict[str, dict[str, Callable[[], object]]]:
    """A training batch of 384 (N, 1, 28, 28) uint8 images gathered from 60,000 and normalized to float32."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8, generator=generator)
    index = torch.randperm(len(images), generator=generator)[:BATCH]
    normalization = Normalization(mean=(0.286,), std=(0.353,))
    scale = torch.tensor([1 / (255 * s) for s in normalization.std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(normalization.mean, normalization.std)]).view(1, -1, 1, 1)
    return {
        "batch preparation (gather + normalize)": {
            "cnnlab": lambda: normalization.apply(images, index),
            "torch": lambda: images[index].to(torch.float32).mul_(scale).sub_(shift),
        },
    }


def shapes() -> dict[str, str]:
    return {
        "pool1 + ReLU forward": f"{SLICE} x 6 x 24 x 24",
        "pool1 + ReLU backward": f"{SLICE} x 6 x 12 x 12 -> {SLICE} x 6 x 24 x 24",
        "conv1 + ReLU + pool1 forward": f"{SLICE} x 1 x 28 x 28, 6 x 1 x 5 x 5",
        "conv1 + ReLU + pool1 backward": f"{SLICE} x 6 x 12 x 12 -> weight and bias",
        "batch preparation (gather + normalize)": f"{BATCH} of 60,000 x 1 x 28 x 28 uint8",
    }


def measure(rounds: int, calls: int) -> list[dict]:
    """Median milliseconds per call of each kernel and its PyTorch counterpart, on one thread."""
    rows = []
    with one_thread():
        kernels = {**pool_kernels(), **conv_pool_kernels(), **batch_kernels()}
        for name, pair in kernels.items():
            seconds = alternate(pair, rounds, calls)
            cnnlab_ms, torch_ms = (round(1e3 * statistics.median(seconds[side]), 3) for side in ("cnnlab", "torch"))
            rows.append({
                "kernel": name,
                "shape": shapes()[name],
                "cnnlab_ms": cnnlab_ms,
                "torch_ms": torch_ms,
                "speedup": round(torch_ms / cnnlab_ms, 2),
                "cnnlab_ms_each_round": [round(1e3 * s, 3) for s in seconds["cnnlab"]],
                "torch_ms_each_round": [round(1e3 * s, 3) for s in seconds["torch"]],
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | shape | cnnlab ms | PyTorch ms | speed-up |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['cnnlab_ms']:.3f} | {row['torch_ms']:.3f} | "
                     f"x{row['speedup']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0], dataset=False)
    args = parser.parse_args(argv)
    rounds, calls = (3, 3) if args.quick else (21, 20)
    rows = measure(rounds, calls)
    write_results(results_path("kernels", args.quick, args.out), {"quick": args.quick, "threads": 1, "rounds": rounds,
                                                         "calls_per_round": calls, "kernels": rows})  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
