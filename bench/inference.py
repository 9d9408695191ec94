"""Inference speed: eager PyTorch against what cnnlab runs, on the same model and images.

For batch sizes 1, 256, cnnlab's evaluation batch (512) and 1024, images per second of
  eager   model.eval(); with torch.no_grad(): model(x)
  cnnlab  with torch.inference_mode(): fast_forward(model)(x), the forward that
          `evaluate` (and training) use
and the largest difference between their logits (none: the fast path computes
the same numbers). Also timed whole: `evaluate()` over the test split (normalization, loss
and argmax included) and `Predictor.predict_batch` (cnnlab predict) at batch 1
and 256. Variants are interleaved, round after round, and the median of the
rounds is reported, so that a busy neighbour slows all of them alike.

    python bench/inference.py --out result.json [--dataset fashion-mnist] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from cnnlab.data.sources import normalization_for
from cnnlab.models import create_model
from cnnlab.predict import Predictor
from cnnlab.train.checkpoint import Checkpoint
from cnnlab.train.evaluate import EVAL_BATCH_SIZE, evaluate
from cnnlab.train.fastpath import fast_forward
from measure import bench_splits, peak_rss_mb

BATCH_SIZES = tuple(sorted({1, 256, EVAL_BATCH_SIZE, 1024}))


def images_per_s(variants: dict, batch: int, rounds: int, seconds_per_call: float) -> dict:
    """Median images/s of each variant over `rounds` interleaved rounds of about `seconds_per_call` each."""
    for run in variants.values():
        run()
    calls = {}
    for name, run in variants.items():
        started = time.perf_counter()
        run()
        calls[name] = max(1, int(seconds_per_call / max(time.perf_counter() - started, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            started = time.perf_counter()
            for _ in range(calls[name]):
                variants[name]()
            rates[name].append(calls[name] * batch / (time.perf_counter() - started))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, seconds_per_call = (3, 0.02) if args.quick else (15, 0.2)

    torch.manual_seed(0)
    splits = bench_splits(args.dataset, 2000 if args.quick else None, args.test_limit, seed=0)
    normalization = normalization_for(splits)
    model = create_model("lenet5", splits.image_shape, len(splits.classes)).eval()
    forward = fast_forward(model)
    test = splits.test
    x_all = normalization.apply(test.images)  # (N, C, H, W) float32

    rows = []
    for batch in BATCH_SIZES:
        x = x_all[:batch] if batch <= len(x_all) else x_all.repeat(-(-batch // len(x_all)), 1, 1, 1)[:batch]

        def eager(x=x):
            with torch.no_grad():
                return model(x)

        def cnnlab(x=x):
            with torch.inference_mode():
                return forward(x)

        difference = (eager() - cnnlab()).abs().max().item()
        rates = images_per_s({"eager": eager, "cnnlab": cnnlab}, batch, rounds, seconds_per_call)
        rows.append({
            "batch": batch,
            "eager_images_per_s": rates["eager"],
            "cnnlab_images_per_s": rates["cnnlab"],
            "speedup": round(rates["cnnlab"] / rates["eager"], 2),
            "max_abs_logit_difference": difference,
        })

    model_info = {"name": "lenet5", "in_shape": list(splits.image_shape), "num_classes": len(splits.classes)}
    checkpoint = Checkpoint(model_info, model.state_dict(), normalization, splits.classes, args.dataset)
    predictor = Predictor(checkpoint)
    whole = {
        "evaluate": lambda: evaluate(model, test, normalization),
        "predict_1": lambda: predictor.predict_batch(test.images[:1], top_k=3),
        "predict_256": lambda: predictor.predict_batch(test.images[:256], top_k=3),
    }
    entry_points = {
        "evaluate_images_per_s": images_per_s({"e": whole["evaluate"]}, len(test), max(3, rounds // 3),
                                              seconds_per_call)["e"],  # fmt: skip
        "predict_batch_1_images_per_s": images_per_s({"p": whole["predict_1"]}, 1, rounds, seconds_per_call)["p"],
        "predict_batch_256_images_per_s": images_per_s({"p": whole["predict_256"]}, 256, rounds, seconds_per_call)["p"],
    }
    result = {
        "model": "lenet5",
        "dataset": args.dataset,
        "test_images": len(test),
        "forward": rows,
        "entry_points": entry_points,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"inference: batch {row['batch']:>4}  eager {row['eager_images_per_s']:>9,.0f} img/s  "
              f"cnnlab {row['cnnlab_images_per_s']:>9,.0f} img/s  x{row['speedup']}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
