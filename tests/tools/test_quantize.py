"""cnnlab quantize: int8 logits close to fp32's, a model serve takes, from a run or a model.onnx; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.tools import latency
from cnnlab.tools.serve.backends import OnnxBackend


@pytest.fixture(autouse=True)
def _few_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "REPEATS", {1: 2, 256: 2})
    monkeypatch.setattr(latency, "ROUNDS", 2)


def test_int8_logits_stay_close_to_fp32_and_the_model_serves(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.int8.onnx"
    assert main(["quantize", str(trained_run), "--out", str(out), "--calibration-images", "256", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["top1_agreement"] >= 0.97
    assert abs(figures["int8_test_accuracy"] - figures["fp32_test_accuracy"]) <= 0.02
    assert figures["int8_bytes"] < figures["fp32_bytes"] / 2  # int8 weights: a quarter of the bytes, plus the graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(figures["int8_ops"])
    backend = OnnxBackend(out.read_bytes(), str(out))  # what `cnnlab serve model.int8.onnx` loads
    assert backend.info.in_shape == (1, 28, 28)
    assert backend.logits(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_an_exported_model_onnx_quantizes_beside_itself(trained_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path)]) == 0
    assert main(["quantize", str(tmp_path / "model.onnx"), "--calibration-images", "64"]) == 0
    figures = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert figures["top1_agreement"] >= 0.95 and figures["calibration_images"] == 64


@pytest.mark.parametrize(
    ("target", "args", "message"),
    [
        ("missing.onnx", [], "does not exist"),
        ("not-a-model.onnx", [], "is not an ONNX model"),
        ("RUN", ["--calibration-images", "0"], "--calibration-images must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained_run: Path, tmp_path: Path, capsys, target, args, message) -> None:
    (tmp_path / "not-a-model.onnx").write_bytes(b"hello")
    path = trained_run if target == "RUN" else tmp_path / target
    assert main(["quantize", str(path), "--out", str(tmp_path / "q.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
