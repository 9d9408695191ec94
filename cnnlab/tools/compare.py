"""Two models side by side: size, sparsity, test accuracy and latency, measured in one process."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import torch

from cnnlab.data.dataset import ImageDataset
from cnnlab.tools.export import ModelInfo, onnx_bytes
from cnnlab.tools.latency import Timed, onnx_model, onnx_session, side_by_side, torch_model
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.evaluate import evaluate


def figures(checkpoint_path: Path, test: ImageDataset) -> tuple[dict[str, Any], dict[str, Timed]]:
    """One model's figures, and the model in PyTorch and in ONNX Runtime to time. File sizes are its ONNX
    file's, as shipped and gzipped (zeros compress)."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build_model()  # (N, C, H, W) float32 -> (N, K), eval mode
    weights = [p for name, p in model.state_dict().items() if name.endswith("weight")]
    data = onnx_bytes(model, torch.zeros(2, *checkpoint.in_shape), ModelInfo.of(checkpoint, None))
    measured = {
        "checkpoint": str(checkpoint_path),
        "widths": checkpoint.model.get("widths"),
        "parameters": sum(p.numel() for p in model.state_dict().values()),
        "nonzeros": sum(int(p.count_nonzero()) for p in model.state_dict().values()),
        "weight_sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
        "onnx_bytes": len(data),
        "onnx_gzip_bytes": len(gzip.compress(data)),
        "test_accuracy": evaluate(model, test, checkpoint.normalization).accuracy,
    }
    timed = {"torch_ms": torch_model(model, checkpoint.in_shape),
             "onnxruntime_ms": onnx_model(onnx_session(data), checkpoint.in_shape)}  # fmt: skip
    return measured, timed


def compare(before: Path, after: Path, test: ImageDataset) -> dict[str, Any]:
    """Both models' figures, their latencies taken side by side in this process, and after's speed-up at each batch."""
    (first, first_timed), (second, second_timed) = figures(before, test), figures(after, test)
    engines = ("torch_ms", "onnxruntime_ms")
    times = side_by_side({f"{side} {engine}": timed[engine]
                          for side, timed in (("before", first_timed), ("after", second_timed)) for engine in engines})  # fmt: skip
    for engine in engines:
        first[engine], second[engine] = times[f"before {engine}"], times[f"after {engine}"]
    speedup = {engine: {batch: first[engine][batch] / second[engine][batch] for batch in first[engine]}
               for engine in engines}  # fmt: skip
    return {"before": first, "after": second, "speedup": speedup, "threads": torch.get_num_threads()}


def table(result: dict[str, Any]) -> str:
    """The before/after table `cnnlab prune` prints."""
    before, after = result["before"], result["after"]
    rows = [
        ("parameters", f"{before['parameters']:,}", f"{after['parameters']:,}"),
        ("non-zeros", f"{before['nonzeros']:,}", f"{after['nonzeros']:,}"),
        ("weight sparsity", f"{100 * before['weight_sparsity']:.1f}%", f"{100 * after['weight_sparsity']:.1f}%"),
        ("ONNX file", f"{before['onnx_bytes']:,} B", f"{after['onnx_bytes']:,} B"),
        ("ONNX gzipped", f"{before['onnx_gzip_bytes']:,} B", f"{after['onnx_gzip_bytes']:,} B"),
        ("test accuracy", f"{100 * before['test_accuracy']:.2f}%", f"{100 * after['test_accuracy']:.2f}%"),
    ]
    for engine, label in (("torch_ms", "PyTorch"), ("onnxruntime_ms", "ONNX Runtime")):
        for batch in before[engine]:
            speed = result["speedup"][engine][batch]
            rows.append((f"{label} batch {batch}", f"{before[engine][batch]:.3f} ms",
                         f"{after[engine][batch]:.3f} ms  (x{speed:.2f})"))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>14}  after"]
    lines += [f"{name:<{width}}  {a:>14}  {b}" for name, a, b in rows]
    return "\n".join(lines)
