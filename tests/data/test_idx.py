import gzip
import struct

import numpy as np
import pytest
import torch

from cnnlab.data import idx
from cnnlab.data.idx import read_idx, read_idx_pair
from cnnlab.errors import CnnlabError
from tests.conftest import idx_bytes


def test_reads_raw_and_gzip_files_identically(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(array))
    (tmp_path / "zipped.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw", 3), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped.gz", 3), array)


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    array = np.ones((5,), dtype=np.uint8)
    (tmp_path / "labels").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels", 1), array)


def test_pair_gives_nchw_images_and_int64_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    x, y = read_idx_pair(tmp_path / "i", tmp_path / "l")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == list(range(7))
    assert torch.equal(x[:, 0], torch.from_numpy(images))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"", "bad magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00", "type 0x0d"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 1, 1) + b"\x00", "2 dimensions, expected 1"),
        (b"\x00\x00\x08\x01\x00\x00", "truncated inside its header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00" * 9, "truncated or corrupt"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00" * 3, "truncated or corrupt"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 0xFFFFFFFF), "more than cnnlab accepts"),
        (b"\x1f\x8b\x08\x00garbage", "cannot read"),
    ],
    ids=["wrong-magic", "empty", "float-type", "wrong-ndim", "short-header", "truncated", "extra-bytes", "huge", "bad-gzip"],
)
def test_corrupt_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(CnnlabError, match=message):
        read_idx(path, 1)


def test_huge_dimension_product_is_refused_before_allocating(tmp_path):
    # 65535^3 bytes would be 280 TB: the header alone must be enough to refuse it.
    path = tmp_path / "bomb"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 65535, 65535, 65535))
    with pytest.raises(CnnlabError, match="more than cnnlab accepts"):
        read_idx(path, 3)


def test_gzip_bomb_is_cut_at_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1000)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 500) + b"\x00" * 1_000_000))
    with pytest.raises(CnnlabError, match="truncated or corrupt"):
        read_idx(path, 1)


def test_image_and_label_count_mismatch_is_reported(tmp_path):
    (tmp_path / "i").write_bytes(idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8)))
    (tmp_path / "l").write_bytes(idx_bytes(np.zeros((4,), dtype=np.uint8)))
    with pytest.raises(CnnlabError, match="3 images but .* 4 labels"):
        read_idx_pair(tmp_path / "i", tmp_path / "l")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CnnlabError, match="cannot read"):
        read_idx(tmp_path / "absent", 1)


def test_a_gzip_bomb_is_refused_one_byte_past_its_declared_size(tmp_path, monkeypatch):
    """50 MB of zeros behind a header declaring 1,568 bytes: reading stops at 1,569, not at the end."""
    declared = 2 * 28 * 28
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28) + bytes(50_000_000)))
    assert path.stat().st_size < 100_000
    read = []

    class CountingGzipFile(gzip.GzipFile):
        def read(self, size=-1):
            chunk = super().read(size)
            read.append(len(chunk))
            return chunk

    monkeypatch.setattr(idx.gzip, "GzipFile", CountingGzipFile)
    with pytest.raises(CnnlabError, match="more than 1568 data bytes but its header says 1568"):
        read_idx(path, 3)
    assert sum(read) == 4 + 3 * 4 + declared + 1
