"""`cnnlab quantize`: static int8 quantization of a model's ONNX graph, measured against fp32.

ONNX Runtime's static quantization: weights become int8 per output channel, and
activations uint8 with scales and zero points fixed once, from the ranges seen
on calibration images taken from the training split (never the test split).
The graph is QDQ (QuantizeLinear / DequantizeLinear pairs around each Conv, Gemm
and MatMul), which ONNX Runtime's CPU execution provider fuses into integer
kernels (QLinearConv, QGemm) when it loads the model.

The int8 model keeps the fp32 model's cnnlab metadata, so `cnnlab serve` takes
it like any exported model. It is tested on the test split, and timed against
the fp32 graph in ONNX Runtime in the same process, side by side (cnnlab/tools/latency.py), at batch 1 and 256.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnlab.atomicfile import atomic_write_bytes, atomic_write_text
from cnnlab.data.sources import get_source
from cnnlab.errors import CnnlabError
from cnnlab.tools.export import ModelInfo, onnx_bytes
from cnnlab.tools.latency import onnx_model, onnx_session, side_by_side
from cnnlab.tools.serve.backends import OnnxBackend
from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path

CALIBRATION_BATCH = 64
EVAL_BATCH = 256
# x86 features ONNX Runtime's MLAS library looks for at start to pick its int8 kernels, best first.
INT8_FEATURES = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


@dataclass(frozen=True)
class Source:
    """The fp32 model to quantize: its ONNX bytes, what it is, where its data lives and where to write."""

    data: bytes
    info: ModelInfo
    data_dir: Path | None
    out: Path  # the int8 model's path


def load_source(path: Path, data_dir: Path | None, out: Path | None) -> Source:
    """A run or checkpoint (exported to ONNX here) or a model.onnx written by `cnnlab export`."""
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise CnnlabError(f"{path} does not exist: pass a model.onnx written by `cnnlab export`, or a run")
        data = path.read_bytes()
        info = OnnxBackend(data, str(path)).info  # checks the graph loads and has cnnlab metadata
        return Source(data, info, data_dir, out or path.with_name(path.stem + ".int8.onnx"))
    checkpoint_path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint(checkpoint_path)
    info = ModelInfo.of(checkpoint, None)
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    config_dir = (checkpoint.config or {}).get("data_dir")
    data = onnx_bytes(checkpoint.build_model(), torch.zeros(2, *info.in_shape), info)
    return Source(data, info, data_dir or (Path(config_dir) if config_dir else None),
                  out or run_dir / "export" / "model.int8.onnx")  # fmt: skip


def quantize(
    path: Path, data_dir: Path | None = None, out: Path | None = None, calibration_images: int = 512, seed: int = 0
) -> dict[str, Any]:
    """Quantize the model at `path` (see `load_source`) into `out`, with the figures in `out`.json:
    accuracy, logit agreement, latency, the CPU's int8 features."""
    import onnxruntime

    if calibration_images < 1:
        raise CnnlabError(f"--calibration-images must be at least 1, got {calibration_images}")
    source = load_source(path, data_dir, out)
    info = source.info
    train, test = get_source(info.dataset).load(source.data_dir)
    if train.image_shape != info.in_shape:
        raise CnnlabError(f"the model takes {info.in_shape} images but '{info.dataset}' has {train.image_shape}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calibration_images]
    calibration = info.normalization.apply(train.images[pick])  # (M, C, H, W) float32
    int8 = quantized_bytes(source.data, calibration)
    atomic_write_bytes(source.out, int8)
    fp32_session, int8_session = onnx_session(source.data), onnx_session(int8)
    fp32_logits, int8_logits = _logits(fp32_session, test, info), _logits(int8_session, test, info)
    labels = test.labels
    times = side_by_side({"fp32": onnx_model(fp32_session, info.in_shape), "int8": onnx_model(int8_session, info.in_shape)})
    fp32_ms, int8_ms = times["fp32"], times["int8"]
    figures = {
        "model": str(source.out),
        "dataset": info.dataset,
        "calibration_images": len(calibration),
        "test_images": len(test),
        "fp32_test_accuracy": _accuracy(fp32_logits, labels),
        "int8_test_accuracy": _accuracy(int8_logits, labels),
        "max_abs_logit_diff": float((int8_logits - fp32_logits).abs().max()),
        "top1_agreement": float((int8_logits.argmax(1) == fp32_logits.argmax(1)).double().mean()),
        "fp32_bytes": len(source.data),
        "int8_bytes": len(int8),
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "speedup": {batch: fp32_ms[batch] / int8_ms[batch] for batch in fp32_ms},
        "onnxruntime": onnxruntime.__version__,
        "execution_provider": int8_session.get_providers()[0],
        "cpu_int8_features": cpu_int8_features(),
        "int8_ops": _op_types(int8),
    }
    atomic_write_text(source.out.with_name(source.out.name + ".json"), json.dumps(figures, indent=2) + "\n")
    return figures


def quantized_bytes(fp32: bytes, calibration: torch.Tensor) -> bytes:
    """Static QDQ int8 (weights int8 per channel, activations uint8), calibrated on `calibration` (M, C, H, W) float32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    with tempfile.TemporaryDirectory(prefix="cnnlab-quantize-") as folder:
        fp32_path, prepared, int8_path = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32_path.write_bytes(fp32)
        # Shape inference and graph cleanup first, as ONNX Runtime recommends before quantizing.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        model = onnx.load(str(int8_path))
    metadata = {p.key: p.value for p in onnx.load_from_string(fp32).metadata_props}
    onnx.helper.set_model_props(model, metadata)  # class names, normalization: what serve reads
    return model.SerializeToString()


def cpu_int8_features() -> list[str]:
    """Which of INT8_FEATURES this CPU advertises (Linux /proc/cpuinfo; [] elsewhere)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [feature for feature in INT8_FEATURES if feature in flags]


def _logits(session, data, info: ModelInfo) -> torch.Tensor:
    """(N, K) float32 logits of `session` over `data`, in batches."""
    name = session.get_inputs()[0].name
    parts = [torch.from_numpy(session.run(None, {name: info.normalization.apply(images).numpy()})[0])
             for images in data.images.split(EVAL_BATCH)]  # fmt: skip
    return torch.cat(parts)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def _op_types(model: bytes) -> list[str]:
    import onnx

    return sorted({node.op_type for node in onnx.load_from_string(model).graph.node})
