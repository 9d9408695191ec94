"""Training precision side by side: speed and final accuracy of fp32 and half precision, per model,
for cnnlab's autograd engine and for the plain PyTorch loop a tutorial writes.

Contenders, per precision: cnnlab (`make_engine`, as `cnnlab train --precision P` trains), and
the plain loop (zero_grad, forward under autocast for a half precision, cross-entropy,
backward, clip, torch.optim SGD step, with cnnlab's defaults: Nesterov momentum 0.9, weight
decay 5e-4, clip 2) in PyTorch's default layout and in channels-last, the layout the PyTorch
performance guides recommend for convolutions on a CPU.

Each contender trains from the same initial weights on the same batches; they take turns
epoch by epoch (the order reversed every other epoch), so a busy neighbour slows them alike.
Speed is images/s of the training steps alone (the epoch's batches are gathered and
normalized before its clock starts); accuracy is the test accuracy after the last epoch,
evaluated in fp32 (evaluation does not autocast). On a CPU the half type is bf16 (fp16
needs CUDA); on CUDA both are measured.

    python bench/precision.py [--models lenet5,resnet20] [--epochs 2] [--train-limit 6000] [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from harness import bench_parser, bench_splits, default_dataset, results_path, train_batches, write_results

from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import normalization_for
from cnnlab.engine import make_engine
from cnnlab.models import create_model
from cnnlab.train.evaluate import evaluate
from cnnlab.train.loop import resolve_device

BATCH_SIZE = 128
LR = 0.05  # SGD with Nesterov momentum at a constant rate: a fair short run for both models


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=6000, help="training images (the first N); default 6000")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images (the first N); default 2000")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_limit, args.test_limit = 1, 256, 256
    started = time.time()
    device = resolve_device(args.device)
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    dataset = args.dataset or default_dataset()
    splits = bench_splits(dataset, args.train_limit, args.test_limit, seed=0)
    normalization = normalization_for(splits)
    test = splits.test.to(device)
    steps = -(-len(splits.train) // BATCH_SIZE)
    figures = {}
    for model_name in args.models.split(","):
        figures[model_name] = compare(model_name, precisions, splits, normalization, test, device, args.epochs, steps)
        for name, row in figures[model_name].items():
            print(f"{model_name:9s} {name:16s} {row['images_per_s']:8.1f} images/s (x{row['speed_vs_cnnlab_fp32']:.2f} "
                  f"cnnlab fp32), test accuracy {100 * row['test_accuracy']:.2f}%")  # fmt: skip
    path = results_path("precision", args.quick, args.out)
    write_results(path, {"dataset": dataset, "train_images": len(splits.train), "test_images": len(test),
                         "epochs": args.epochs, "batch_size": BATCH_SIZE, "lr": LR, "device": str(device),
                         "models": figures}, started)  # fmt: skip


class PlainStep:
    """One step of the plain PyTorch loop, on `model` (laid out channels-last if asked), in `precision`."""

    def __init__(self, model: torch.nn.Module, precision: str, channels_last: bool, device: torch.device) -> None:
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last, self.device_type = channels_last, device.type
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        defaults = OptimConfig()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=defaults.momentum,
                                         nesterov=defaults.nesterov, weight_decay=defaults.weight_decay)  # fmt: skip
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.clip = defaults.grad_clip

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def compare(model_name, precisions, splits, normalization, test, device, epochs: int, steps: int) -> dict:
    """{contender: {"images_per_s", "speed_vs_cnnlab_fp32", "test_accuracy", "epoch_seconds"}} for one model;
    contenders "cnnlab P", "plain P" and "plain-cl P" for each precision P."""
    torch.manual_seed(0)
    initial = create_model(model_name, splits.image_shape, len(splits.classes))

    def fresh() -> torch.nn.Module:
        model = create_model(model_name, splits.image_shape, len(splits.classes))
        model.load_state_dict(initial.state_dict())
        return model.to(device).train()

    contenders = {}
    for precision in precisions:
        config = TrainConfig(model=model_name, precision=precision, optim=OptimConfig(lr=LR, schedule="constant"))
        contenders[f"cnnlab {precision}"] = make_engine(fresh(), config)
        contenders[f"plain {precision}"] = PlainStep(fresh(), precision, False, device)
        contenders[f"plain-cl {precision}"] = PlainStep(fresh(), precision, True, device)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for epoch in range(epochs):
        batches = [(x.to(device), y.to(device)) for x, y in train_batches(splits.train, normalization, BATCH_SIZE, steps, seed=epoch)]
        order = list(contenders) if epoch % 2 == 0 else list(reversed(contenders))
        for name in order:
            _sync(device)
            start = time.perf_counter()
            for x, y in batches:
                contenders[name].train_step(x, y, LR)
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    images = steps * BATCH_SIZE
    rows = {}
    for name, contender in contenders.items():
        rate = images / statistics.median(seconds[name])
        accuracy = evaluate(contender.model, test, normalization).accuracy
        rows[name] = {"images_per_s": round(rate, 1), "test_accuracy": accuracy,
                      "epoch_seconds": [round(s, 2) for s in seconds[name]]}  # fmt: skip
    for row in rows.values():
        row["speed_vs_cnnlab_fp32"] = round(row["images_per_s"] / rows["cnnlab fp32"]["images_per_s"], 3)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
