"""Fetch the public datasets: `cnnlab datasets --download NAME`.

Each file is tried on several mirrors in turn and must match its published
SHA-256 before it takes its final name. Bytes arrive in a hidden `.NAME.part`
file beside the target; an interrupted transfer is continued from where it
stopped with an HTTP Range request (now, or on the next run), and only a
complete, verified file is fsync'd and renamed into place, so the dataset
folder never holds a truncated or corrupt file under a name the readers use.

Mirrors can be replaced, for an offline mirror or a test server: pass
`mirrors` (base URLs that hold the files directly), or set CNNLAB_MIRRORS to
comma-separated base URLs holding one sub-folder per dataset
(`$BASE/mnist/train-images-idx3-ubyte.gz`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import cnnlab
from cnnlab.atomicfile import fsync_dir
from cnnlab.data.sources import IDX_FILES, data_roots
from cnnlab.errors import CnnlabError

TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 16
MAX_ATTEMPTS_PER_MIRROR = 5  # retries continue only while each attempt makes progress


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str
    size: int  # bytes; a server sending more is sending something else


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file's URL is mirror + file name
    files: tuple[RemoteFile, ...]


def _idx_files(*files: tuple[str, int]) -> tuple[RemoteFile, ...]:
    """The four gzipped IDX files of an MNIST-like dataset, from (SHA-256, size) in IDX_FILES order."""
    return tuple(RemoteFile(f"{name}.gz", sha256, size) for name, (sha256, size) in zip(IDX_FILES, files))


# Checksums are those of the files the dataset authors publish; the same values
# appear in torchvision's and Keras's download code.
DATASETS = {
    d.name: d
    for d in (
        RemoteDataset(
            "mnist",
            (
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            _idx_files(
                ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
                ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
                ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
                ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
            ),
        ),
        RemoteDataset(
            "fashion-mnist",
            (
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            ),
            _idx_files(
                ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
                ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
                ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
                ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
            ),
        ),
        RemoteDataset(
            "kmnist",
            ("https://codh.rois.ac.jp/kmnist/dataset/kmnist/", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
            _idx_files(
                ("51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", 18165135),
                ("e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", 29497),
                ("edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", 3041136),
                ("20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", 5120),
            ),
        ),
        RemoteDataset(
            "cifar10",
            ("https://www.cs.toronto.edu/~kriz/", "http://www.cs.toronto.edu/~kriz/"),
            (
                RemoteFile(
                    "cifar-10-python.tar.gz",
                    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                    170498071,
                ),
            ),
        ),
        RemoteDataset(
            "cifar100",
            ("https://www.cs.toronto.edu/~kriz/", "http://www.cs.toronto.edu/~kriz/"),
            (
                RemoteFile(
                    "cifar-100-python.tar.gz",
                    "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                    169001437,
                ),
            ),
        ),
    )
}


def download(
    name: str, data_dir: Path | None = None, mirrors: Sequence[str] | None = None, stream: TextIO | None = None
) -> Path:
    """Fetch every file of dataset `name` into the first data root's `name` folder; returns that folder.

    Files already there with the right checksum are kept. `stream` gets the
    progress (a bar on a terminal, one line per file otherwise); stderr by default.
    """
    if name not in DATASETS:
        raise CnnlabError(f"cnnlab cannot download '{name}': choose one of {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    folder = data_roots(data_dir)[0] / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"cannot create {folder} ({exc.strerror}): choose another place with --data-dir") from None
    stream = stream or sys.stderr
    for file in dataset.files:
        urls = [base + file.name for base in _mirrors_for(dataset, mirrors)]
        fetch(file, urls, folder / file.name, stream, by_hand=_by_hand(dataset, folder))
    return folder


def fetch(file: RemoteFile, urls: Sequence[str], target: Path, stream: TextIO, by_hand: str = "") -> None:
    """Put `file` at `target`, verified, trying `urls` in order."""
    if target.is_file():
        if _sha256(target) == file.sha256:
            print(f"{target} is already there", file=stream)
            return
        print(f"{target} does not match its published checksum; downloading it again", file=stream)
    part = target.with_name(f".{target.name}.part")
    failures = []
    for url in urls:
        failure = _fetch_from(url, file, part, stream)
        if failure is None:
            os.replace(part, target)
            fsync_dir(target.parent)
            return
        failures.append(f"{url} ({failure})")
    by_hand = by_hand or f"download {file.name} yourself into {target.parent}"
    tried = "; ".join(failures)
    raise CnnlabError(f"could not download {file.name}: {tried}. Check the network connection, or {by_hand}")


def _fetch_from(url: str, file: RemoteFile, part: Path, stream: TextIO) -> str | None:
    """Download `url` into `part` until it is complete and verified; None then, else why not."""
    for _attempt in range(MAX_ATTEMPTS_PER_MIRROR):
        before = _size(part)
        try:
            if before < file.size:
                _transfer(url, file, part, stream)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and before:  # the server cannot continue our partial copy: start over
                part.unlink(missing_ok=True)
                continue
            return f"HTTP {exc.code} {exc.reason}"
        except _WrongFile as exc:
            part.unlink(missing_ok=True)
            return str(exc)
        except (OSError, http.client.HTTPException) as exc:
            if _size(part) > before:
                continue  # the transfer was cut but got somewhere: continue it with a Range request
            return _reason(exc)
        if _size(part) < file.size:
            if _size(part) > before:
                continue
            return f"the transfer stopped at {_size(part):,} of {file.size:,} bytes"
        if _sha256(part) == file.sha256:
            return None
        part.unlink(missing_ok=True)
        if before == 0:
            return "the file's SHA-256 does not match the published one"
        # The bad copy may have been continued from an earlier, different partial file: retry whole.
    return f"gave up after {MAX_ATTEMPTS_PER_MIRROR} attempts"


class _WrongFile(Exception):
    """The server is sending something other than the file asked for."""


def _transfer(url: str, file: RemoteFile, part: Path, stream: TextIO) -> None:
    """Append the missing bytes of `url` to `part` (or rewrite it, if the server cannot resume)."""
    have = _size(part)
    headers = {"User-Agent": f"cnnlab/{cnnlab.__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
        if have and response.status == 206 and _range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        else:
            have, mode = 0, "wb"  # a plain 200 is the whole file again
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and have + int(length) > file.size:
            raise _WrongFile(f"the server sends {have + int(length):,} bytes, but {file.name} has {file.size:,}")
        bar = _progress(file, have, stream)
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK_BYTES):
                    have += len(chunk)
                    if have > file.size:
                        raise _WrongFile(f"the server sent more than the {file.size:,} bytes of {file.name}")
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            if bar is not None:
                bar.close()
            else:
                print(f"{file.name}: {have:,} of {file.size:,} bytes from {url}", file=stream)


def _progress(file: RemoteFile, have: int, stream: TextIO):
    if not stream.isatty():
        return None
    from tqdm import tqdm  # imported here: only a terminal needs it

    return tqdm(total=file.size, initial=have, unit="B", unit_scale=True, desc=file.name, file=stream, leave=False)


def _mirrors_for(dataset: RemoteDataset, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is not None:
        bases = list(mirrors)
    elif os.environ.get("CNNLAB_MIRRORS"):
        given = [b.strip().rstrip("/") for b in os.environ["CNNLAB_MIRRORS"].split(",") if b.strip()]
        bases = [f"{b}/{dataset.name}/" for b in given]
    else:
        bases = list(dataset.mirrors)
    return [b if b.endswith("/") else b + "/" for b in bases]


def _by_hand(dataset: RemoteDataset, folder: Path) -> str:
    names = ", ".join(f.name for f in dataset.files)
    return f"download {names} yourself from {dataset.mirrors[0]} into {folder}"


def _range_start(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
