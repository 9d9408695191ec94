"""A training batch split across a CPU's cores: each core runs the network on its own slice.

LeNet-sized layers are thin for oneDNN to share one operator between two
cores. Two one-thread workers that each run the whole forward and backward
pass on half of the batch keep both cores busy with less coordination
(`python bench/fastpath.py` times the step sliced and whole, each in its own
process). Below 64 images a slice, per-operator overhead eats the gain, so
smaller batches are not split. `cnnlab.engine.step.SlicedStep` is the
training step built on this; evaluation uses it too.

Only models whose output for an image depends on that image and the
parameters alone, and whose forward pass changes nothing, may be split:
batch-norm (statistics over the batch, running averages) and dropout (draws
from the shared generator, in whichever order the threads reach it) may not.
`splittable` accepts the layers known to qualify, not whatever is not known
to break.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from cnnlab.models.recurrent import RowReader

MIN_SLICE = 64  # images; smaller slices lose more to per-operator overhead than the second core gains
# Each slice holds the GIL for its Python part of the step (module calls, autograd.Function
# plumbing: ~5% of it). Measured on two cores only; beyond a few slices that serial part
# would grow, so larger machines give each slice several intra-op threads instead.
MAX_SLICES = 4
STATELESS = (
    nn.Sequential, nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
    nn.Identity, RowReader, nn.RNN, nn.LSTM,  # the recurrent readers start every image from a zero state
)  # fmt: skip

Result = TypeVar("Result")


def splittable(model: nn.Module) -> bool:
    """Whether `model`'s forward pass treats images independently and has no side effects."""
    return all(type(module) in STATELESS for module in model.modules())


def slice_count(model: nn.Module, device: torch.device | str) -> int:
    """How many slices a full batch is split into: one per intra-op thread (<= MAX_SLICES) on a CPU."""
    if torch.device(device).type != "cpu" or not splittable(model):
        return 1
    return min(torch.get_num_threads(), MAX_SLICES)


@contextlib.contextmanager
def sliced(batch_size: int, slices: int) -> Iterator[int]:
    """Within: how many slices (<= `slices`, of >= MIN_SLICE images) a batch of `batch_size` takes.

    While more than one, each thread's operators use 1/count of the intra-op threads, so
    the slices do not oversubscribe the cores; that also holds for the step's tail (summing
    the slices' gradients, the update), whose tiny operators run faster on one thread than
    on two. The thread count is restored on the way out.
    """
    count = max(1, min(slices, batch_size // MIN_SLICE))
    if count == 1:
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // count))
    try:
        yield count
    finally:
        torch.set_num_threads(threads)


def map_slices(
    work: Callable[[int, torch.Tensor, torch.Tensor], Result], x: torch.Tensor, y: torch.Tensor, count: int
) -> list[Result]:
    """[work(i, x_i, y_i) for each of `count` consecutive slices i of x (N, ...) and y (N, ...)].

    The slices run at once, slice 0 on the calling thread; count=1 runs work(0, x, y) inline.
    Call it inside `sliced`, which sets how many threads each slice's operators get. Grad
    mode is per thread: a `work` that must not record a graph says so itself.
    """
    if count == 1:
        return [work(0, x, y)]
    xs, ys = x.tensor_split(count), y.tensor_split(count)
    futures = []
    try:
        pool = _workers(count - 1)
        futures = [pool.submit(work, i, xs[i], ys[i]) for i in range(1, count)]
        first = work(0, xs[0], ys[0])
        return [first, *(future.result() for future in futures)]
    finally:
        concurrent.futures.wait(futures)  # none may still run once the caller moves on


def sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """tensors[0] + tensors[1] + ...: left to right, as float addition is not associative, so a
    sliced step repeats bit for bit."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


# The pool threads keep OpenMP's and MKL's default thread counts (both are per thread, and
# `sliced` sets the caller's only), so MKL's matrix products start two-thread OpenMP teams on
# them. With more OpenMP threads than cores, libgomp stops spinning between parallel regions,
# process-wide. That is what keeps OpenMP's worker from spinning for milliseconds on a slice's
# core after each batch's two-thread preparation: setting the pool threads' counts too made
# `cnnlab train`'s epochs 5-10% slower, with or without the batch prepared on one thread. The
# price is paid by two-thread operators run later in the same process, which wait on thread
# wake-ups: a plain PyTorch loop trained 10-40% slower after one sliced epoch. Speed
# comparisons with a sliced step therefore run each contender in its own process.
@functools.cache
def _workers(count: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of `count` threads, kept for the process's life (starting threads per step would cost more)."""
    return concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="cnnlab-slice")
