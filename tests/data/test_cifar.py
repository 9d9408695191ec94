import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from cnnlab.data import cifar
from cnnlab.data.cifar import load_pickle, read_cifar10, read_cifar100
from cnnlab.data.sources import get_source, load_splits, normalization_for
from cnnlab.errors import CnnlabError


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way the official CIFAR files were written (Python 2, numpy 1, protocol 2):
    bytes as BINSTRING, the array reconstructor as numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n: int, num_classes: int, seed: int, label_key: bytes = b"labels") -> dict:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in np.arange(n) % num_classes]
    return {
        b"batch_label": b"training batch",
        label_key: labels,
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar10(folder, n=20, archive=False, dump=py2_pickle):
    """A CIFAR-10 folder in the official layout, `n` images per batch; as the .tar.gz with `archive`."""
    files = {f"data_batch_{i}": dump(cifar_batch(n, 10, i)) for i in range(1, 6)}
    files["test_batch"] = dump(cifar_batch(n, 10, 99))
    files["batches.meta"] = dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    _write(folder, "cifar-10-batches-py", files, "cifar-10-python.tar.gz" if archive else None)
    return folder


def write_cifar100(folder, n=30, archive=False):
    files = {}
    for name, seed in (("train", 1), ("test", 2)):
        batch = cifar_batch(n, 100, seed, b"fine_labels")
        batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
        files[name] = py2_pickle(batch)
    files["meta"] = py2_pickle(
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
    )
    _write(folder, "cifar-100-python", files, "cifar-100-python.tar.gz" if archive else None)
    return folder


def _write(folder, inner, files, archive):
    folder.mkdir(parents=True, exist_ok=True)
    if archive is None:
        (folder / inner).mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / inner / name).write_bytes(data)
        return
    with tarfile.open(folder / archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_reads_the_official_layout_into_nchw_uint8(tmp_path):
    write_cifar10(tmp_path)
    train, test = read_cifar10(tmp_path)
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32) and train.labels.dtype == torch.int64
    assert train.classes == tuple(f"class{i}" for i in range(10))
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    row = cifar_batch(20, 10, 1)[b"data"][3]
    assert torch.equal(train.images[3, 1], torch.from_numpy(row[1024:2048].reshape(32, 32)))
    assert train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_the_archive_and_the_unpacked_folder_give_the_same_data(tmp_path):
    write_cifar10(tmp_path / "a", archive=True)
    write_cifar10(tmp_path / "b")
    (train_a, test_a), (train_b, test_b) = read_cifar10(tmp_path / "a"), read_cifar10(tmp_path / "b")
    assert torch.equal(train_a.images, train_b.images) and torch.equal(test_a.labels, test_b.labels)


def test_pickles_written_by_numpy_2_and_python_3_are_read_too(tmp_path):
    write_cifar10(tmp_path / "p2", dump=lambda obj: pickle.dumps(obj, protocol=2))
    write_cifar10(tmp_path / "p4", dump=lambda obj: pickle.dumps(obj, protocol=4))
    assert torch.equal(read_cifar10(tmp_path / "p2")[0].images, read_cifar10(tmp_path / "p4")[0].images)


def test_cifar100_uses_the_fine_labels(tmp_path):
    write_cifar100(tmp_path, archive=True)
    train, test = read_cifar100(tmp_path)
    assert train.image_shape == (3, 32, 32) and len(train.classes) == 100 and train.classes[7] == "fine7"
    assert train.labels.tolist() == list(range(30)) and len(test) == 30


def test_cifar_sources_are_found_packed_or_unpacked_and_normalized_per_channel(tmp_path):
    write_cifar10(tmp_path / "cifar10", archive=True)
    write_cifar100(tmp_path / "cifar100")
    assert get_source("cifar10").find(tmp_path) == tmp_path / "cifar10"
    assert get_source("cifar100").find(tmp_path) == tmp_path / "cifar100"
    splits = load_splits("cifar10", tmp_path, val_fraction=0.2, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)
    norm = normalization_for(splits)
    assert len(norm.mean) == 3
    expected = splits.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert norm.mean == pytest.approx(expected.tolist(), rel=1e-6)


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data = pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2)
    with pytest.raises(CnnlabError, match=r"refers to (posix|os)\.system, which no CIFAR file does"):
        load_pickle(data, "evil")
    assert not marker.exists()


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "3 images but 2 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels outside 0..9"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "1024 values per image"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "not uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "lacks 'labels'"),
        ({b"data": [1, 2], b"labels": [0, 1]}, "not an array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "cat"]}, "not a list of whole numbers"),
        ([1, 2, 3], "does not hold a dict"),
    ],
)
def test_malformed_batches_are_clear_errors(tmp_path, batch, message):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(py2_pickle(batch))
    with pytest.raises(CnnlabError, match=message):
        read_cifar10(tmp_path)


def test_an_array_whose_bytes_do_not_match_its_shape_is_refused(tmp_path):
    data = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    shrunk = data.replace(b"\x00" * 6144, b"\x00" * 6143).replace(struct.pack("<i", 6144), struct.pack("<i", 6143))
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(shrunk)
    with pytest.raises(CnnlabError, match="holds a different number of bytes"):
        read_cifar10(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 3])  # half of it; or only 3 bytes, which ends inside the gzip header
def test_a_truncated_archive_is_a_clear_error(tmp_path, keep):
    write_cifar10(tmp_path, archive=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    size = archive.stat().st_size
    archive.write_bytes(archive.read_bytes()[: int(size * keep) if keep < 1 else keep])
    with pytest.raises(CnnlabError, match="corrupt or truncated"):
        read_cifar10(tmp_path)


def test_an_archive_missing_a_batch_names_it(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        data = py2_pickle(cifar_batch(2, 10, 0))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CnnlabError, match="lacks cifar-10-batches-py/data_batch_2"):
        read_cifar10(tmp_path)


def test_a_pickle_claiming_a_huge_string_fails_without_allocating_it():
    claims_8_gib = b"\x80\x04\x8e" + struct.pack("<Q", 8 << 30) + b"abc"
    with pytest.raises(CnnlabError, match="not a complete pickle"):
        load_pickle(claims_8_gib, "bomb")


def test_a_file_larger_than_any_cifar_file_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "MAX_PICKLE_BYTES", 1000)
    write_cifar10(tmp_path)
    with pytest.raises(CnnlabError, match="larger than any CIFAR file"):
        read_cifar10(tmp_path)
