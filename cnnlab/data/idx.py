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
# early keeps a hostile header from exhausting memory.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Return the array in `path`: uint8, with `expected_ndim` dimensions.

    The header is read and checked first; the data is then read in chunks up to one
    byte past what the header declares, so a gzip bomb (a small file that unpacks to
    far more) is refused as soon as it passes the declared size, not after inflating.
    """
    try:
        with open(path, "rb") as f:
            if f.read(2) != _GZIP_MAGIC:
                f.seek(0)
                return _read_idx_stream(f, path, expected_ndim)
            f.seek(0)
            with gzip.GzipFile(fileobj=f) as unzipped:
                return _read_idx_stream(unzipped, path, expected_ndim)
    except (OSError, EOFError, zlib.error) as exc:
        raise CnnlabError(f"cannot read {path}: {exc}; download the file again") from None


def _read_idx_stream(stream: BinaryIO, path: Path, expected_ndim: int) -> np.ndarray:
    magic = _read_at_most(stream, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise CnnlabError(f"{path} is not an IDX file (bad magic number): replace it with the original download")
    type_code, ndim = magic[2], magic[3]
    if type_code != _UBYTE:
        raise CnnlabError(f"{path} holds IDX type 0x{type_code:02x}; cnnlab reads unsigned-byte (0x08) files only")
    if ndim != expected_ndim:
        raise CnnlabError(f"{path} has {ndim} dimensions, expected {expected_ndim}: is it the right file?")
    dims = _read_at_most(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise CnnlabError(f"{path} is truncated inside its header: download it again")
    shape = struct.unpack(f">{ndim}I", dims)
    # Python's exact integers: np.prod in int64 wraps, and a header of 2**31 x 2**31 x 4
    # would claim 0 bytes and slip past the checks below.
    count = math.prod(shape)
    if count > MAX_IDX_BYTES:
        raise CnnlabError(f"{path} claims {count} bytes of data (shape {shape}), more than cnnlab accepts: the header is corrupt")
    data = _read_at_most(stream, count + 1)
    if len(data) != count:
        found = f"more than {count}" if len(data) > count else str(len(data))
        raise CnnlabError(
            f"{path} has {found} data bytes but its header says {count} (shape {shape}): "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Up to `limit` bytes of `stream`, in chunks: `read(limit)` would allocate `limit` bytes
    up front (1 GiB here) however small the file is."""
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(min(1 << 20, limit - len(data)))):
        data += chunk
    return data
