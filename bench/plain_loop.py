"""Contender (b): a well-written plain PyTorch loop, with no speed tricks.

The whole training split is normalized once and held in memory as one float32
tensor; a batch is a slice of a shuffled index. Same LeNet-5 as cnnlab (built
by cnnlab's registry: plain torch layers, same initialisation), batch 256,
SGD with Nesterov momentum 0.9 and weight decay 5e-4, torch's OneCycleLR,
15 epochs. PyTorch's own layers, no fused kernels, default allocator: what a
careful PyTorch user writes first.

The length is the one that gets this loop to 90% test accuracy soonest on
Fashion-MNIST (seed 0): over 10 epochs it ends at 89.9% without reaching it;
over 15 it first reaches it at epoch 14 (90.2%, ending at 90.3%); over 20 at
epoch 18, over 30 at epoch 23 (ending at 90.5%).

    python bench/plain_loop.py --out result.json [--budget 300] [--dataset fashion-mnist]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from cnnlab.data.dataset import DatasetSplits
from cnnlab.models import create_model
from harness import Clock, Record, Turns, bench_splits, contender_parser, test_accuracy

BATCH_SIZE = 256
EPOCHS = 15
LR = 0.1


def main(argv: list[str] | None = None) -> int:
    args = contender_parser(__doc__.splitlines()[0], EPOCHS).parse_args(argv)

    torch.manual_seed(args.seed)
    splits = bench_splits(args.dataset, args.train_limit, args.test_limit, args.seed)
    x_train, x_test = normalized(splits)
    y_train = splits.train.labels

    model = create_model("lenet5", splits.image_shape, len(splits.classes))
    steps_per_epoch = -(-len(x_train) // BATCH_SIZE)
    optimizer, scheduler = sgd_one_cycle(model, args.epochs * steps_per_epoch)

    record = Record("plain PyTorch loop", f"tensors in memory, batch {BATCH_SIZE}, SGD Nesterov + OneCycleLR {LR}",
                    BATCH_SIZE, len(x_train), args.seed)  # fmt: skip
    turns = Turns(args.turn_fds, record.turns)
    turns.take()
    clock = Clock(args.budget)
    for epoch in range(1, args.epochs + 1):
        model.train()
        started, images = time.perf_counter(), 0
        order = torch.randperm(len(x_train))
        for start in range(0, len(x_train), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            step(model, optimizer, scheduler, x_train[index], y_train[index])
            images += len(index)
            if clock.spent():
                break
        seconds = time.perf_counter() - started
        record.stopped_by_budget = images < len(x_train) or (clock.spent() and epoch < args.epochs)
        elapsed = clock.elapsed()
        with clock.stopped():
            model.eval()
            accuracy = test_accuracy(model, x_test, splits.test.labels)
            record.add_epoch(round(epoch - 1 + images / len(x_train), 3), elapsed, seconds, images, accuracy)
            record.final_test_accuracy = round(accuracy, 4)
            print(f"plain loop: epoch {epoch}  test {100 * accuracy:.2f}%", file=sys.stderr)
            turns.take()
        if record.stopped_by_budget:
            break
    record.write(args.out)
    return 0


def normalized(splits: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images as float32 (N, C, H, W), standardized per channel by the train split's statistics."""
    pixels = splits.train.images.to(torch.float32).div_(255)
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True)
    return (pixels - mean) / std, (splits.test.images.to(torch.float32).div_(255) - mean) / std


def sgd_one_cycle(model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, OneCycleLR]:
    """SGD with Nesterov momentum and weight decay under torch's one-cycle schedule peaking at LR."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return optimizer, OneCycleLR(optimizer, max_lr=LR, total_steps=total_steps)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: OneCycleLR, x: torch.Tensor, y: torch.Tensor):
    """One training step on x (B, C, H, W) float32 and y (B,), in the textbook order."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


if __name__ == "__main__":
    sys.exit(main())
