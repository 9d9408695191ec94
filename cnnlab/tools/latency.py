"""Inference latency, side by side: PyTorch (cnnlab's fast forward) and ONNX Runtime, at batch 1 and 256.

Figures are in milliseconds per call. The models compared are timed in
interleaved rounds (each round times every model once), and a model's figure is
its lowest round median: the round least disturbed by the rest of the machine.
Interleaved, a burst of load on a shared host falls on every model alike rather
than on whichever was being timed. Figures are only comparable with others taken
in the same call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cnnlab.fast.forward import fast_forward

BATCHES = (1, 256)
REPEATS = {1: 200, 256: 20}  # calls per round
ROUNDS = 5

# A model to time: batch size -> a call that runs it once on a batch of that size.
Timed = Callable[[int], Callable[[], object]]


def side_by_side(models: dict[str, Timed]) -> dict[str, dict[int, float]]:
    """{name: {batch: ms}} for every batch in BATCHES, the models timed in interleaved rounds."""
    figures: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in BATCHES:
        calls = {name: make(batch) for name, make in models.items()}
        rounds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(ROUNDS):
            for name, call in calls.items():
                rounds[name].append(median_ms(call, REPEATS[batch]))
        for name in calls:
            figures[name][batch] = min(rounds[name])
    return figures


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


def torch_model(model: nn.Module, in_shape: tuple[int, int, int]) -> Timed:
    """The fast forward cnnlab predicts and evaluates with, on (batch, *in_shape) float32."""
    forward = fast_forward(model.eval())

    def at(batch: int) -> Callable[[], object]:
        x = torch.randn(batch, *in_shape)

        def call() -> object:
            with torch.inference_mode():
                return forward(x)

        return call

    return at


def onnx_session(model_bytes: bytes):
    """An ONNX Runtime session on the CPU execution provider, with its threads not spinning between calls."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def onnx_model(session, in_shape: tuple[int, int, int]) -> Timed:
    """`session` on (batch, *in_shape) float32 inputs."""
    name = session.get_inputs()[0].name

    def at(batch: int) -> Callable[[], object]:
        x = torch.randn(batch, *in_shape).numpy()
        return lambda: session.run(None, {name: x})

    return at
