"""Shared test fixtures: small hand-built data, and one trained run reused by the CLI tests."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright cannot download its own browsers here


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding of a uint8 array: magic, big-endian dimensions, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_folder(folder: Path, n_train: int = 60, n_test: int = 20, size: int = 28, compress: bool = True) -> Path:
    """An MNIST-format dataset of simple, learnable patterns: class k has a bright bar in row band k."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, size, size))
        band = size // 10
        for i, label in enumerate(labels):
            images[i, label * band : (label + 1) * band, :] = 255
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A data dir holding a tiny hand-built 'mnist' folder."""
    write_mnist_folder(tmp_path / "data" / "mnist")
    return tmp_path / "data"


@pytest.fixture
def require_fashion_mnist() -> Path:
    """The system Fashion-MNIST folder; skips without it, fails instead when CNNLAB_REQUIRE_DATA is set (CI)."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        message = f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CNNLAB_REQUIRE_DATA"):
            pytest.fail(message + "; CNNLAB_REQUIRE_DATA is set, so this is an error")
        pytest.skip(message)
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 run on digits, 3 epochs: good enough to tell digits apart, made once per test session."""
    from cnnlab.cli import main

    runs = tmp_path_factory.mktemp("runs")
    status = main(["train", "--epochs", "3", "--batch-size", "32", "--runs-dir", str(runs), "--name", "digits", "--json"])
    assert status == 0
    return runs / "digits"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless; skips without it, fails instead when CNNLAB_REQUIRE_DATA is set (CI)."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("CNNLAB_REQUIRE_DATA"):
            pytest.fail(message + "; CNNLAB_REQUIRE_DATA is set, so this is an error")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()
