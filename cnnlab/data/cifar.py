"""Read CIFAR-10 and CIFAR-100 from their official "python version" files, without running code.

The files are Python pickles of dicts holding a uint8 numpy array `data`
(N x 3072: 1024 red, 1024 green, 1024 blue values per image, row-major) and
lists of labels. Unpickling may call any function the file names, so cnnlab
never lets it: `_SafeUnpickler.find_class` resolves only the four names these
files use (numpy's array and dtype reconstructors, and the latin-1 encoder
Python 3 writes for bytes), and resolves them to inert stand-ins defined here,
not to numpy. A file that names anything else (`os.system`, say) is refused
before any of it is acted on.

Before unpickling, `_check_opcodes` walks the opcodes once: every length the
file claims must fit in the bytes it has, and only plain-data opcodes may
appear. Without that, a 20-byte file claiming an 8 GiB string makes the
unpickler allocate 8 GiB before noticing the file is short.

The datasets come as one .tar.gz (read directly, as a stream) or as its
unpacked folder.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cnnlab.data.dataset import ImageDataset
from cnnlab.errors import CnnlabError

PIXELS = 3 * 32 * 32
# The largest official file is CIFAR-100's `train`, 155 MB; anything far beyond is not CIFAR.
MAX_PICKLE_BYTES = 256 * 2**20
# Stop reading an archive after this much: the official ones unpack to under 200 MB.
MAX_ARCHIVE_BYTES = 1 << 30

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_UNPACKED = tuple(f"{CIFAR10_FOLDER}/{name}" for name in (*CIFAR10_TRAIN, "test_batch", "batches.meta"))
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_UNPACKED = tuple(f"{CIFAR100_FOLDER}/{name}" for name in ("train", "test", "meta"))

_File = tuple[bytes, str]  # a file's content, and where it came from for messages


def read_cifar10(folder: Path | None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) from `folder`/cifar-10-batches-py or `folder`/cifar-10-python.tar.gz.

    images (N, 3, 32, 32) uint8, labels (N,) int64; 50,000 and 10,000 images in the official files.
    """
    assert folder is not None
    files = _read_files(folder, CIFAR10_UNPACKED, "cifar-10-python.tar.gz")
    classes = _class_names(files[f"{CIFAR10_FOLDER}/batches.meta"], "label_names", 10)
    parts = [_images_and_labels(files[f"{CIFAR10_FOLDER}/{name}"], "labels", 10) for name in CIFAR10_TRAIN]
    train = ImageDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), classes)
    test = ImageDataset(*_images_and_labels(files[f"{CIFAR10_FOLDER}/test_batch"], "labels", 10), classes)
    return train, test


def read_cifar100(folder: Path | None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) with the 100 fine labels, from `folder`/cifar-100-python or its .tar.gz."""
    assert folder is not None
    files = _read_files(folder, CIFAR100_UNPACKED, "cifar-100-python.tar.gz")
    classes = _class_names(files[f"{CIFAR100_FOLDER}/meta"], "fine_label_names", 100)
    train = ImageDataset(*_images_and_labels(files[f"{CIFAR100_FOLDER}/train"], "fine_labels", 100), classes)
    test = ImageDataset(*_images_and_labels(files[f"{CIFAR100_FOLDER}/test"], "fine_labels", 100), classes)
    return train, test


def load_pickle(data: bytes, origin: str) -> object:
    """Unpickle CIFAR's plain data (dicts, lists, bytes, ints, uint8 arrays); refuse anything else.

    Arrays come back as `_Array` stand-ins; `_to_uint8_matrix` turns one into numpy after checking it.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise CnnlabError(f"{origin} is {len(data):,} bytes, larger than any CIFAR file: it is not one")
    _check_opcodes(data, origin)
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise CnnlabError(f"{origin} refers to {exc}, which no CIFAR file does; cnnlab will not unpickle it") from None
    except Exception as exc:  # hostile input can raise almost anything from inside the unpickler
        problem = f"{type(exc).__name__}: {exc}"
        raise CnnlabError(f"{origin} is not a readable CIFAR file ({problem}): download it again") from None


# Opcodes that build only plain data. Excluded, among others: PERSID/BINPERSID and
# EXT1/2/4 (other ways to name objects), INST/OBJ/NEWOBJ (instantiate classes),
# BYTEARRAY8 and the out-of-band buffer opcodes, which CIFAR files never use.
_PLAIN_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "BINFLOAT FLOAT STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 UNICODE BINUNICODE "
    "SHORT_BINUNICODE BINUNICODE8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS "
    "EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET "
    "LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BUILD".split()
)


def _check_opcodes(data: bytes, origin: str) -> None:
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name not in _PLAIN_OPCODES:
                raise CnnlabError(
                    f"{origin} uses the pickle opcode {opcode.name}, which no CIFAR file does: it is not one"
                )
    except CnnlabError:
        raise
    except Exception as exc:  # genops reports truncation and bad opcodes as ValueError, and worse input otherwise
        raise CnnlabError(f"{origin} is not a CIFAR file (not a complete pickle: {exc}): download it again") from None


class _RefusedGlobal(Exception):
    pass


class _Global:
    """What `find_class` hands the unpickler: a name the pickle may call, but not alter.

    A pickle can also give state to any object it holds (the BUILD opcode), which
    would set attributes on a plain function or class and outlast this load;
    these refuse state instead.
    """

    __slots__ = ("_call",)

    def __init__(self, call: Callable[..., object]) -> None:
        self._call = call

    def __call__(self, *args: object) -> object:
        return self._call(*args)

    def __setstate__(self, state: object) -> None:
        raise ValueError("a global cannot be given state")


class _Dtype:
    """Stands for a `numpy.dtype`: keeps its name ('u1' for uint8) and byte order."""

    def __init__(self, name: object, align: object = False, copy: object = True) -> None:
        self.name = name
        self.byteorder: object = "|"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1:
            self.byteorder = state[1]


class _Array:
    """Stands for a numpy array: its shape, dtype and raw bytes, unchecked until `_to_uint8_matrix`."""

    shape: object = None
    dtype: object = None
    raw: object = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("an array's state must be (version, shape, dtype, fortran, data)")
        _version, self.shape, self.dtype, _fortran, self.raw = state


def _not_callable(*args: object) -> object:
    raise ValueError("numpy.ndarray is only an argument of _reconstruct here")


_NDARRAY = _Global(_not_callable)  # stands for the class numpy.ndarray


def _reconstruct(cls: object, shape: object, typecode: object) -> _Array:
    if cls is not _NDARRAY:
        raise ValueError("_reconstruct builds arrays only")
    return _Array()


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # How Python 3 pickles `bytes` at protocol 2: codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("only latin-1 text can be encoded")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Global(_reconstruct),  # as numpy 1 (and the official files) write it
    ("numpy._core.multiarray", "_reconstruct"): _Global(_reconstruct),  # as numpy 2 writes it
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global(_Dtype),
    ("_codecs", "encode"): _Global(_latin1_encode),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _to_uint8_matrix(value: object, origin: str) -> np.ndarray:
    """A checked (N, 3072) uint8 array from an `_Array` stand-in."""
    if not isinstance(value, _Array):
        raise CnnlabError(f"{origin}: 'data' is not an array: not a CIFAR file")
    dtype = value.dtype
    if not (isinstance(dtype, _Dtype) and dtype.name in ("u1", b"u1", "uint8", b"uint8")):
        raise CnnlabError(f"{origin}: 'data' is not uint8 pixels: not a CIFAR file")
    shape = value.shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise CnnlabError(f"{origin}: 'data' has shape {shape!r}, expected (N, {PIXELS})")
    if shape[1] != PIXELS:
        raise CnnlabError(f"{origin}: 'data' has {shape[1]} values per image, expected {PIXELS} (3x32x32)")
    raw = value.raw
    if not isinstance(raw, bytes) or len(raw) != shape[0] * shape[1]:
        raise CnnlabError(
            f"{origin}: 'data' claims shape {shape} but holds a different number of bytes: the file is corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _as_dict(value: object, origin: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise CnnlabError(f"{origin} does not hold a dict: not a CIFAR file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def _images_and_labels(file: _File, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file."""
    data, origin = file
    batch = _as_dict(load_pickle(data, origin), origin)
    if "data" not in batch or label_key not in batch:
        raise CnnlabError(f"{origin} lacks '{'data' if 'data' not in batch else label_key}': not a CIFAR batch")
    pixels = _to_uint8_matrix(batch["data"], origin)
    labels = batch[label_key]
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise CnnlabError(f"{origin}: '{label_key}' is not a list of whole numbers: not a CIFAR batch")
    if len(labels) != pixels.shape[0]:
        raise CnnlabError(
            f"{origin} holds {pixels.shape[0]} images but {len(labels)} labels: the file is corrupt, download it again"
        )
    if labels and not 0 <= min(labels) <= max(labels) < num_classes:
        raise CnnlabError(f"{origin} has labels outside 0..{num_classes - 1}: the file is corrupt, download it again")
    images = torch.from_numpy(pixels.copy()).view(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
    return images, torch.tensor(labels, dtype=torch.int64)


def _class_names(file: _File, key: str, count: int) -> tuple[str, ...]:
    data, origin = file
    meta = _as_dict(load_pickle(data, origin), origin)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, (bytes, str)) for n in names):
        raise CnnlabError(f"{origin}: '{key}' is not a list of {count} class names: not the right meta file")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _read_files(folder: Path, names: tuple[str, ...], archive: str) -> dict[str, _File]:
    """The bytes of each of `names`, from the unpacked folder if present, else from the archive."""
    if all((folder / name).is_file() for name in names):
        return {name: (_read_capped(folder / name), str(folder / name)) for name in names}
    return _read_from_archive(folder / archive, names)


def _read_capped(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
    except OSError as exc:
        raise CnnlabError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise CnnlabError(f"{path} is larger than any CIFAR file: it is not one")
    return data


def _read_from_archive(path: Path, names: tuple[str, ...]) -> dict[str, _File]:
    found: dict[str, _File] = {}
    try:
        # Stream mode ("r|gz") decompresses once, front to back, instead of seeking.
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if tar.offset > MAX_ARCHIVE_BYTES:
                    raise CnnlabError(f"{path} unpacks to more than {MAX_ARCHIVE_BYTES >> 20} MiB: not a CIFAR archive")
                if member.name not in names:
                    continue
                if not member.isfile() or member.size > MAX_PICKLE_BYTES:
                    raise CnnlabError(
                        f"{path}: {member.name} is not a regular file of CIFAR's size: not a CIFAR archive"
                    )
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file always has content
                found[member.name] = (extracted.read(), f"{path}:{member.name}")
                if len(found) == len(names):
                    break
    except CnnlabError:
        raise
    except FileNotFoundError:
        raise CnnlabError(f"{path} does not exist") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, TypeError) as exc:
        # TypeError: Python's stream reader calls ord() on the empty read of a gzip header cut short.
        raise CnnlabError(
            f"cannot read {path} ({exc}): the archive is corrupt or truncated, download it again"
        ) from None
    missing = [n for n in names if n not in found]
    if missing:
        raise CnnlabError(f"{path} lacks {', '.join(missing)}: is it the right archive?")
    return found
