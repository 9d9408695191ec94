"""Read IDX files, the format of MNIST, Fashion-MNIST and KMNIST.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data. Only unsigned
bytes (type 0x08) occur in these datasets, so only they are accepted.
Files may be gzip-compressed; the reader decides by the gzip magic, not the name.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from cnnlab.errors import CnnlabError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# An IDX file larger than this is not one of the datasets cnnlab reads; refusing
# early keeps a hostile header or gzip bomb from exhausting memory.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Return the array in `path`: uint8, with `expected_ndim` dimensions."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CnnlabError(f"{path} is not an IDX file (bad magic number): replace it with the original download")
    type_code, ndim = raw[2], raw[3]
    if type_code != _UBYTE:
        raise CnnlabError(f"{path} holds IDX type 0x{type_code:02x}; cnnlab reads unsigned-byte (0x08) files only")
    if ndim != expected_ndim:
        raise CnnlabError(f"{path} has {ndim} dimensions, expected {expected_ndim}: is it the right file?")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise CnnlabError(f"{path} is truncated inside its header: download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    # Python's exact integers: np.prod in int64 wraps, and a header of 2**31 x 2**31 x 4
    # would claim 0 bytes and slip past the checks below.
    count = math.prod(shape)
    if count > MAX_IDX_BYTES:
        raise CnnlabError(f"{path} claims {count} bytes of data (shape {shape}), more than cnnlab accepts: the header is corrupt")
    if len(raw) - header_end != count:
        raise CnnlabError(
            f"{path} has {len(raw) - header_end} data bytes but its header says {count} (shape {shape}): "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an IDX image file and its label file."""
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise CnnlabError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels: "
            "the two files do not belong together"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_bytes(path: Path) -> bytes | bytearray:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return _read_at_most(f, MAX_IDX_BYTES + 1024)
            with gzip.GzipFile(fileobj=f) as unzipped:
                # Read at most the limit plus a header: a gzip bomb stops here.
                return _read_at_most(unzipped, MAX_IDX_BYTES + 1024)
    except (OSError, EOFError, zlib.error) as exc:
        raise CnnlabError(f"cannot read {path}: {exc}; download the file again") from None


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Up to `limit` bytes of `stream`, in chunks: `read(limit)` would allocate `limit` bytes
    up front (1 GiB here) however small the file is."""
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(min(1 << 20, limit - len(data)))):
        data += chunk
    return data
