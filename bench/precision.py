"""Training precision side by side: speed and final accuracy of fp32 and half precision, per model.

Each model trains from the same initial weights on the same batches once per precision;
the precisions take turns epoch by epoch, so a busy neighbour slows them alike. Speed is
images/s of the training steps alone (the epoch's batches are gathered and normalized
before its clock starts); accuracy is the test accuracy after the last epoch, evaluated in
fp32 (evaluation does not autocast). On a CPU the half type is bf16 (fp16 needs CUDA);
on CUDA both are measured.

    python bench/precision.py [--models lenet5,resnet20] [--epochs 2] [--train-limit 6000] [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch
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
        for precision, row in figures[model_name].items():
            print(f"{model_name:9s} {precision}: {row['images_per_s']:8.1f} images/s (x{row['speed_vs_fp32']:.2f}), "
                  f"test accuracy {100 * row['test_accuracy']:.2f}%")  # fmt: skip
    path = results_path("precision", args.quick, args.out)
    write_results(path, {"dataset": dataset, "train_images": len(splits.train), "test_images": len(test),
                         "epochs": args.epochs, "batch_size": BATCH_SIZE, "lr": LR, "device": str(device),
                         "models": figures}, started)  # fmt: skip


def compare(model_name, precisions, splits, normalization, test, device, epochs: int, steps: int) -> dict:
    """{precision: {"images_per_s", "speed_vs_fp32", "test_accuracy", "epoch_seconds"}} for one model."""
    torch.manual_seed(0)
    initial = create_model(model_name, splits.image_shape, len(splits.classes))
    engines = {}
    for precision in precisions:
        model = create_model(model_name, splits.image_shape, len(splits.classes))
        model.load_state_dict(initial.state_dict())
        config = TrainConfig(model=model_name, precision=precision, optim=OptimConfig(lr=LR, schedule="constant"))
        engines[precision] = make_engine(model.to(device).train(), config)
    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    for epoch in range(epochs):
        batches = [(x.to(device), y.to(device)) for x, y in train_batches(splits.train, normalization, BATCH_SIZE, steps, seed=epoch)]
        order = precisions if epoch % 2 == 0 else tuple(reversed(precisions))
        for precision in order:
            _sync(device)
            start = time.perf_counter()
            for x, y in batches:
                engines[precision].train_step(x, y, LR)
            _sync(device)
            seconds[precision].append(time.perf_counter() - start)
    images = steps * BATCH_SIZE
    rows = {}
    for precision in precisions:
        rate = images / statistics.median(seconds[precision])
        accuracy = evaluate(engines[precision].model, test, normalization).accuracy
        rows[precision] = {"images_per_s": round(rate, 1), "test_accuracy": accuracy,
                           "epoch_seconds": [round(s, 2) for s in seconds[precision]]}  # fmt: skip
    for row in rows.values():
        row["speed_vs_fp32"] = round(row["images_per_s"] / rows["fp32"]["images_per_s"], 3)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
