"""Random, truncated and hostile bytes into every reader: a correct dataset or a CnnlabError, nothing else.

The readers of untrusted bytes: IDX files, CIFAR batches and archives, image
folders and single images (`decode_image`), YAML config files (`load_yaml_config`)
and checkpoints (`load_checkpoint`). No crash (another exception type), no hang
(pytest-timeout and hypothesis deadlines), no allocation driven by a header's
claims (tracemalloc), no code run by a pickle (marker files that a payload would
create).

`make test` tries a few dozen to a few hundred inputs per test; a real search sets
CNNLAB_FUZZ_EXAMPLES (10000 or more) to run that many per test, without the time limit:

    CNNLAB_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/data/test_fuzz.py -k checkpoint
"""

import builtins
import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import tarfile
import tracemalloc
import uuid
import warnings
import zlib

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.config import load_yaml_config
from cnnlab.data import cifar
from cnnlab.data.cifar import load_pickle, read_cifar10
from cnnlab.data.folder import FolderSpec, read_image_folder
from cnnlab.data.idx import read_idx, read_idx_pair
from cnnlab.data.images import NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError, decode_image
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import Checkpoint, digest_path, load_checkpoint
from tests.data.test_cifar import cifar_batch, py2_pickle, write_cifar10

FUZZ_EXAMPLES = int(os.environ.get("CNNLAB_FUZZ_EXAMPLES") or 0)


def fuzz(examples: int) -> settings:
    """Hypothesis settings trying `examples` inputs, or CNNLAB_FUZZ_EXAMPLES when it is set."""
    return settings(
        max_examples=FUZZ_EXAMPLES or examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


FUZZ = fuzz(150)
pytestmark = pytest.mark.timeout(0 if FUZZ_EXAMPLES else 120)  # 0: no limit, for a long search


def fresh(tmp_path):
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    return folder


def mutate(data: bytes, edits) -> bytes:
    """Apply (kind, position, value) edits: flip a byte, cut the rest off, or insert a byte."""
    data = bytearray(data)
    for kind, position, value in edits:
        if not data:
            break
        i = position % len(data)
        if kind == "flip":
            data[i] ^= value or 1
        elif kind == "cut":
            del data[i:]
        else:
            data.insert(i, value)
    return bytes(data)


edit_lists = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 2**31), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


# IDX


def idx_bytes(zeros: bytes, type_code: int, dims: list[int], data: bytes) -> bytes:
    return zeros + bytes([type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


# IDX-like bytes: a maybe-right magic and type, any dimensions (or small ones that can match), a short data part.
idx_like = st.builds(
    idx_bytes,
    st.sampled_from([b"\x00\x00", b"\x00\x01", b"\x1f\x8b"]),
    st.sampled_from([0x08, 0x08, 0x09, 0x0D]),
    st.one_of(st.lists(st.integers(0, 2**32 - 1), max_size=4), st.lists(st.integers(0, 12), min_size=1, max_size=3)),
    st.binary(max_size=300),
)


@FUZZ
@given(content=st.one_of(st.binary(max_size=400), idx_like), ndim=st.integers(1, 3), zipped=st.booleans())
def test_idx_reader_returns_the_declared_array_or_a_clear_error(tmp_path, content, ndim, zipped):
    path = tmp_path / "file"
    path.write_bytes(gzip.compress(content) if zipped else content)
    try:
        array = read_idx(path, ndim)
    except CnnlabError:
        return
    shape = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
    assert array.dtype == np.uint8 and array.shape == shape
    assert array.tobytes() == content[4 + 4 * ndim :]


@FUZZ
@given(dims=st.lists(st.integers(2**16, 2**32 - 1), min_size=3, max_size=3))
def test_idx_headers_claiming_huge_arrays_allocate_nothing(tmp_path, dims):
    path = tmp_path / "huge"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", *dims) + b"\x00" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(CnnlabError, match="more than cnnlab accepts|truncated or corrupt"):
            read_idx(path, 3)
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    finally:
        tracemalloc.stop()


def test_idx_dimensions_whose_product_overflows_64_bits_are_refused(tmp_path):
    path = tmp_path / "wraps"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 4))  # 2**64 wraps to 0 in int64
    with pytest.raises(CnnlabError, match="more than cnnlab accepts"):
        read_idx(path, 3)


@FUZZ
@given(edits=edit_lists, which=st.sampled_from(["images", "labels"]))
def test_idx_pairs_with_damaged_files_load_consistently_or_fail_clearly(tmp_path, edits, which):
    folder = fresh(tmp_path)
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    files = {
        "images": b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 4, 4) + images.tobytes(),
        "labels": b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(range(5)),
    }
    files[which] = mutate(files[which], edits)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    try:
        x, y = read_idx_pair(folder / "images", folder / "labels")
    except CnnlabError:
        return
    assert x.dim() == 4 and x.shape[1] == 1 and len(x) == len(y)


# CIFAR

plain_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=40) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from([b"data", b"labels", b"label_names", "data", 1]), children, max_size=4)
    | st.tuples(children, children),
    max_leaves=20,
)


def batch_is_valid_or_refused(tmp_path, data: bytes):
    folder = write_cifar10(fresh(tmp_path), n=4)
    (folder / "cifar-10-batches-py" / "data_batch_2").write_bytes(data)
    try:
        train, test = read_cifar10(folder)
    except CnnlabError:
        return
    assert train.images.shape[1:] == (3, 32, 32) and len(train.labels) == len(train.images)
    assert int(train.labels.max()) < 10


@FUZZ
@given(content=st.binary(max_size=600))
def test_random_bytes_as_a_cifar_batch(tmp_path, content):
    batch_is_valid_or_refused(tmp_path, content)


@FUZZ
@given(edits=edit_lists, protocol=st.sampled_from(["py2", 2, 4, 5]))
def test_damaged_cifar_batches(tmp_path, edits, protocol):
    batch = cifar_batch(3, 10, 0)
    data = py2_pickle(batch) if protocol == "py2" else pickle.dumps(batch, protocol=protocol)
    batch_is_valid_or_refused(tmp_path, mutate(data, edits))


@FUZZ
@given(value=plain_data, protocol=st.integers(0, 5))
def test_arbitrary_plain_pickles_as_a_cifar_batch(tmp_path, value, protocol):
    batch_is_valid_or_refused(tmp_path, pickle.dumps(value, protocol=protocol))


@FUZZ
@given(data=st.binary(max_size=200), rows=st.integers(0, 3), protocol=st.integers(0, 5))
def test_uint8_arrays_of_the_wrong_shape_or_size(tmp_path, data, rows, protocol):
    array = np.frombuffer(data, dtype=np.uint8)
    for value in (array, array.reshape(1, -1), np.zeros((rows, 3072), np.uint8)[:, : len(data)]):
        batch = {b"data": value, b"labels": [0] * (value.shape[0] if value.ndim == 2 else 1)}
        batch_is_valid_or_refused(tmp_path, pickle.dumps(batch, protocol=protocol))


class Payload:
    """Pickles as a call of `func(*args)`: what a hostile file would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return [
        Payload(os.system, f"touch {marker}"),
        Payload(builtins.eval, touch),
        Payload(builtins.exec, touch),
        Payload(subprocess.Popen, ["touch", str(marker)]),
        Payload(builtins.open, str(marker), "w"),
        Payload(builtins.getattr, Payload(builtins.__import__, "os"), "system"),
        Payload(builtins.__import__, "os"),
        Payload(np.load, str(marker)),
        Payload(pickle.loads, pickle.dumps(Payload(os.system, f"touch {marker}"))),
        Payload(np.frombuffer, b"\x00" * 3072, np.uint8),
    ]


@pytest.mark.parametrize("protocol", range(6))
def test_pickles_with_code_payloads_are_refused_and_never_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for payload in hostile_payloads(marker):
        for wrap in (lambda p: p, lambda p: {b"data": p, b"labels": [0]}, lambda p: [1, {b"x": (p,)}]):
            data = pickle.dumps(wrap(payload), protocol=protocol)
            with pytest.raises(CnnlabError, match="will not unpickle|not a readable CIFAR file|opcode"):
                load_pickle(data, "hostile")
            assert not marker.exists(), f"{payload.func} ran"


def test_the_allowed_stand_ins_cannot_be_abused(tmp_path):
    ndarray_reconstruct = b"cnumpy.core.multiarray\n_reconstruct\n"
    cases = [
        b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",  # another codec
        b"\x80\x02" + ndarray_reconstruct + b"cbuiltins\nobject\n)X\x01\x00\x00\x00b\x87R.",  # another class
        b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R.",  # an object dtype, used as data below
    ]
    for data in cases:
        try:
            value = load_pickle(data, "abuse")
        except CnnlabError:
            continue
        with pytest.raises(CnnlabError):
            cifar._to_uint8_matrix(value, "abuse")


def test_a_pickle_cannot_give_state_to_the_allowed_names():
    """BUILD on a global would set attributes on it for every later load; it is refused."""
    for module, name in (("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                         ("numpy.core.multiarray", "_reconstruct")):  # fmt: skip
        data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}X\x01\x00\x00\x00xK\x01s\x86b."
        with pytest.raises(CnnlabError, match="not a readable CIFAR file"):
            load_pickle(data, "build")
        assert not hasattr(cifar._ALLOWED_GLOBALS[(module, name)], "x")


def test_a_pickle_claiming_huge_lengths_allocates_nothing():
    tracemalloc.start()
    try:
        for opcode in (b"\x8e", b"\x8d", b"\x96"):  # BINBYTES8, BINUNICODE8, BYTEARRAY8
            with pytest.raises(CnnlabError):
                load_pickle(b"\x80\x05" + opcode + struct.pack("<Q", 8 << 30) + b"abc", "bomb")
        with pytest.raises(CnnlabError):
            load_pickle(b"\x80\x02T" + struct.pack("<i", 2**31 - 1) + b"abc", "bomb")  # BINSTRING
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def cifar_archive_bytes(tmp_path_factory):
    folder = write_cifar10(tmp_path_factory.mktemp("cifar"), n=3, archive=True)
    return (folder / "cifar-10-python.tar.gz").read_bytes()


@FUZZ
@given(edits=edit_lists)
def test_damaged_cifar_archives(tmp_path, cifar_archive_bytes, edits):
    folder = fresh(tmp_path)
    (folder / "cifar-10-python.tar.gz").write_bytes(mutate(cifar_archive_bytes, edits))
    try:
        train, _ = read_cifar10(folder)
    except CnnlabError:
        return
    assert train.images.shape[1:] == (3, 32, 32)


@FUZZ
@given(content=st.binary(max_size=2000), zipped=st.booleans())
def test_random_bytes_as_a_cifar_archive(tmp_path, content, zipped):
    folder = fresh(tmp_path)
    (folder / "cifar-10-python.tar.gz").write_bytes(gzip.compress(content) if zipped else content)
    with pytest.raises(CnnlabError):
        read_cifar10(folder)


def test_an_archive_member_claiming_a_huge_size_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0123456789"))
    raw = bytearray(buffer.getvalue())
    raw[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")  # base-256 size field: 1 TiB
    raw[148:156] = b" " * 8
    raw[148:155] = f"{sum(raw[:512]):06o}\0".encode()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CnnlabError):
        read_cifar10(tmp_path)


# Image folders


def png_bytes(size=(6, 5), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_claiming(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def bmp_claiming(width, height) -> bytes:
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
    return header + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)


def opens(content: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(content)):
            return True
    except Exception:
        return False


bad_images = st.one_of(
    st.binary(max_size=300),
    st.builds(mutate, st.sampled_from([png_bytes(), jpeg_bytes()]), edit_lists),
    st.builds(png_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(bmp_claiming, st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)),
)


@fuzz(60)
@given(content=bad_images, suffix=st.sampled_from([".png", ".jpg", ".bmp", ".webp"]), strict=st.booleans())
def test_image_folders_with_bad_files_skip_them_or_fail_clearly(tmp_path, content, suffix, strict):
    root = fresh(tmp_path)
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "good.png").write_bytes(png_bytes())
    (root / "b" / f"bad{suffix}").write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            splits = read_image_folder(FolderSpec.parse(f"folder:{root},size=6x5"), strict=strict)
        except CnnlabError:
            return
    total = len(splits.train) + len(splits.test)
    assert splits.train.image_shape == splits.test.image_shape and splits.train.images.shape[2:] == (6, 5)
    assert total == 3 - len(splits.skipped) and len(splits.skipped) <= 1
    assert not strict or not splits.skipped
    assert bool(splits.skipped) == any("skipped 1 unreadable" in str(w.message) for w in caught)


@fuzz(40)
@given(content=bad_images)
def test_a_bad_first_image_does_not_decide_the_size(tmp_path, content):
    root = fresh(tmp_path)
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "z.png").write_bytes(png_bytes(size=(7, 3)))
    (root / "a" / "a.png").write_bytes(content)
    assume(not opens(content))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            splits = read_image_folder(FolderSpec.parse(f"folder:{root}"))
        except CnnlabError:
            return
    assert splits.train.image_shape[1:] == (3, 7)


# Single images: what `cnnlab predict` and `cnnlab serve` decode


def image_bytes(format: str, mode: str = "RGB", size=(5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format=format)
    return buffer.getvalue()


# A valid file of every format decode_image accepts, in a few pixel modes, to damage.
IMAGE_SAMPLES = [
    image_bytes(format, mode)
    for format, modes in (("PNG", "RGB L P LA I;16 RGBA"), ("JPEG", "RGB L CMYK"), ("BMP", "RGB L P"),
                          ("WEBP", "RGB RGBA"), ("GIF", "P L"), ("TIFF", "RGB L I F CMYK"), ("PPM", "RGB L"))  # fmt: skip
    for mode in modes.split()
]

images = st.one_of(bad_images, st.builds(mutate, st.sampled_from(IMAGE_SAMPLES), edit_lists), st.sampled_from(IMAGE_SAMPLES))


@FUZZ
@given(content=images, channels=st.sampled_from([1, 3]), height=st.integers(1, 9), width=st.integers(1, 9))
def test_decode_image_gives_the_model_input_or_an_image_error(content, channels, height, width):
    try:
        x = decode_image(content, (channels, height, width), name="fuzzed")
    except ImageError as exc:
        assert exc.reason in (TOO_MANY_PIXELS, NOT_AN_IMAGE)
        return
    assert x.dtype == torch.uint8 and x.shape == (channels, height, width)


# YAML config files: what `cnnlab train --config FILE` reads

# Mappings from option names (and section names) to any plain values, as a user might write by mistake.
option_names = st.sampled_from(["lr", "epochs", "model", "dataset", "optim", "augment", "data", "seed", "momentum"])
option_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(option_names | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
yaml_mappings = st.dictionaries(option_names | st.text(max_size=8), option_values, max_size=5).map(yaml.safe_dump)


@FUZZ
@given(document=st.one_of(st.text(max_size=300), yaml_mappings))
def test_yaml_config_files_load_as_a_mapping_or_fail_clearly(tmp_path, document):
    path = tmp_path / "run.yaml"
    path.write_text(document, encoding="utf-8")
    try:
        options = load_yaml_config(path)
    except CnnlabError:
        return
    assert isinstance(options, dict)


# Checkpoints: what `cnnlab evaluate/predict/export/serve` and `--resume` load


@functools.cache
def checkpoint_bytes() -> bytes:
    """A small valid checkpoint (LeNet-5 weights, no optimizer state), as `torch.save` writes it."""
    from tests.train.test_checkpoint import make_checkpoint

    buffer = io.BytesIO()
    checkpoint = make_checkpoint()
    torch.save({"cnnlab_checkpoint": 1, "model": checkpoint.model, "model_state": checkpoint.model_state,
                "normalization": checkpoint.normalization.to_dict(), "classes": list(checkpoint.classes),
                "dataset": "digits", "epoch": 1, "step": 7}, buffer)  # fmt: skip
    return buffer.getvalue()


def checkpoint_loads_or_is_refused(path):
    try:
        checkpoint = load_checkpoint(path)
    except CnnlabError:
        return
    assert isinstance(checkpoint, Checkpoint)


@FUZZ
@given(edits=edit_lists, sidecar=st.sampled_from(["written with it", "garbage"]))
def test_damaged_checkpoints_beside_their_sidecar_are_refused(tmp_path, edits, sidecar):
    """What a run directory holds: a flipped, cut or grown checkpoint no longer matches its SHA-256."""
    path = fresh(tmp_path) / "last.pt"
    data = mutate(checkpoint_bytes(), edits)
    path.write_bytes(data)
    if sidecar == "garbage":
        digest_path(path).write_bytes(data[:80])
    else:
        digest_path(path).write_text(f"{hashlib.sha256(checkpoint_bytes()).hexdigest()}  last.pt\n")
    if data == checkpoint_bytes() and sidecar != "garbage":
        assert load_checkpoint(path).epoch == 1
    else:
        with pytest.raises(CnnlabError, match="corrupt|cannot be verified"):
            load_checkpoint(path)


checkpoint_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.builds(torch.zeros, st.integers(0, 3)) | st.builds(torch.ones, st.integers(0, 2), st.integers(0, 2)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
FIELDS = ("model", "model_state", "normalization", "classes", "dataset", "epoch", "step", "optimizer_state", "rng")


@FUZZ
@given(
    marker=st.integers(-2, 3),
    fields=st.dictionaries(st.sampled_from(FIELDS), checkpoint_values, max_size=len(FIELDS)),
    keep=st.sets(st.sampled_from(FIELDS)),
)
def test_checkpoints_of_plain_values_with_any_fields_load_or_are_refused(tmp_path, marker, fields, keep):
    """torch.save of plain values, as a hostile writer could make: the format marker, then any fields."""
    valid = torch.load(io.BytesIO(checkpoint_bytes()), weights_only=True)
    payload = {"cnnlab_checkpoint": marker, **{k: valid[k] for k in keep if k in valid}, **fields}
    path = tmp_path / "plain.pt"
    torch.save(payload, path)
    checkpoint_loads_or_is_refused(path)
