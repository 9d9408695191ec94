"""Inference latency, side by side: PyTorch (cnnlab's fast forward) and ONNX Runtime, at batch 1 and 256.

Figures are medians over repeated calls after a warm-up, in milliseconds per
call. They are only comparable with figures taken in the same process, one
after another, on the same machine: the ratios are what mean something.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cnnlab.fast.forward import fast_forward

BATCHES = (1, 256)
REPEATS = {1: 200, 256: 20}


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """The median wall time of `call()` over `repeats` calls, after a few warm-up calls."""
    for _ in range(max(3, repeats // 10)):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def torch_latency(model: nn.Module, in_shape: tuple[int, int, int]) -> dict[int, float]:
    """{batch: ms} of the fast forward cnnlab predicts and evaluates with, on (batch, *in_shape) float32."""
    forward = fast_forward(model.eval())
    figures = {}
    with torch.inference_mode():
        for batch in BATCHES:
            x = torch.randn(batch, *in_shape)
            figures[batch] = median_ms(lambda x=x: forward(x), REPEATS[batch])
    return figures


def onnx_session(model_bytes: bytes):
    """An ONNX Runtime session on the CPU execution provider, with its threads not spinning between calls."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def onnx_latency(session, in_shape: tuple[int, int, int]) -> dict[int, float]:
    """{batch: ms} of `session` on (batch, *in_shape) float32 inputs."""
    name = session.get_inputs()[0].name
    figures = {}
    for batch in BATCHES:
        x = torch.randn(batch, *in_shape).numpy()
        figures[batch] = median_ms(lambda x=x: session.run(None, {name: x}), REPEATS[batch])
    return figures
