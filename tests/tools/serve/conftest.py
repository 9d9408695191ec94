"""Fixtures for the server tests: the trained digits run as backends, digit images as PNG files, a fake model."""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cnnlab.data.dataset import Normalization
from cnnlab.tools.export import ModelInfo
from cnnlab.tools.serve.app import Settings, create_app
from cnnlab.tools.serve.backends import Backend, load_backend


def png_bytes(image: torch.Tensor) -> bytes:
    """(1, H, W) uint8 -> PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def digit_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight test images of the digits dataset as PNG files."""
    from cnnlab.data.sources import load_splits

    folder = tmp_path_factory.mktemp("digits-png")
    images = load_splits("digits", None, 0.1, 0).test.images[:8]  # (8, 1, 28, 28) uint8
    paths = [folder / f"digit{i}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        path.write_bytes(png_bytes(image))
    return paths


@pytest.fixture(scope="session")
def torch_backend(trained_run: Path) -> Backend:
    return load_backend(trained_run, "torch")


@pytest.fixture(scope="session")
def onnx_backend(trained_run: Path) -> Backend:
    """The run without an export on disk: exported in memory, run by ONNX Runtime."""
    return load_backend(trained_run, "onnx")


class FakeBackend:
    """A model of 8x8 grey images and two classes that answers class b when `gate` is open; counts its calls."""

    kind = "fake"
    sha256 = "0" * 64
    info = ModelInfo("fake", (1, 8, 8), ("a", "b"), Normalization((0.5,), (0.25,)), "digits", 0.5, "0")

    def __init__(self, gate_open: bool = True) -> None:
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()
        self.calls = 0  # counted on entry, before the gate
        self.batches: list[int] = []  # sizes, once through the gate

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert self.gate.wait(10), "the test never opened the gate"
        self.batches.append(len(x))
        return torch.tensor([[0.0, 1.0]]).repeat(len(x), 1)


@contextmanager
def serving(backend: Backend, **settings) -> Iterator[TestClient]:
    """A TestClient over create_app(backend, Settings(**settings)), started and (unless its gate is shut) warm."""
    with TestClient(create_app(backend, Settings(**settings))) as client:
        if not isinstance(backend, FakeBackend) or backend.gate.is_set():
            wait_until(lambda: client.get("/readyz").status_code == 200)
        yield client


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
