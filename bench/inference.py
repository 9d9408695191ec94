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

    python bench/inference.py [--out result.json] [--dataset fashion-mnist] [--quick]
"""

from __future__ import annotations

import statistics
import sys

import torch

from cnnlab.data.sources import normalization_for
from cnnlab.models import create_model
from cnnlab.tools.predict import Predictor
from cnnlab.train.checkpoint import Checkpoint
from cnnlab.train.evaluate import EVAL_BATCH_SIZE, evaluate
from cnnlab.fast.forward import fast_forward
from harness import (
    alternate, bench_parser, bench_splits, calls_for, default_dataset, peak_rss_mb, results_path, write_json,
)

BATCH_SIZES = tuple(sorted({1, 256, EVAL_BATCH_SIZE, 1024}))


def images_per_s(variants: dict, batch: int, rounds: int, seconds_per_call: float) -> dict:
    """Median images/s of each variant over `rounds` alternating rounds of about `seconds_per_call` each."""
    seconds = alternate(variants, rounds, calls_for(variants, seconds_per_call))
    return {name: round(batch / statistics.median(s), 1) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--test-limit", type=int)
    args = parser.parse_args(argv)
    dataset, out = args.dataset or default_dataset(), results_path("inference", args.quick, args.out)
    rounds, seconds_per_call = (3, 0.02) if args.quick else (15, 0.2)

    torch.manual_seed(0)
    splits = bench_splits(dataset, 2000 if args.quick else None, args.test_limit, seed=0)
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
    checkpoint = Checkpoint(model_info, model.state_dict(), normalization, splits.classes, dataset)
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
        "dataset": dataset,
        "test_images": len(test),
        "forward": rows,
        "entry_points": entry_points,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_json(out, result)
    for row in rows:
        print(f"inference: batch {row['batch']:>4}  eager {row['eager_images_per_s']:>9,.0f} img/s  "
              f"cnnlab {row['cnnlab_images_per_s']:>9,.0f} img/s  x{row['speedup']}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
