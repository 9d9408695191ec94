"""A user's own images as a dataset: `--dataset folder:PATH`.

PATH holds one sub-folder per class (the ImageFolder convention), or `train/`
with optional `val/` and `test/`, each holding the class sub-folders:

    PATH/cat/1.png PATH/dog/2.jpg           or   PATH/train/cat/1.png PATH/test/cat/9.png ...

Without `test/`, a fixed stratified fifth of the training images is the test
set (the same on every run, like `digits`); without `val/`, training carves the
usual validation split. PNG, JPEG, BMP and WebP files are read (anything else is
ignored, as are hidden files), converted to one size and channel count:

    folder:PATH,size=64          64x64 (size=48x64 for height 48, width 64)
    folder:PATH,channels=1       grey (3 for RGB)

By default the size is the first image's and the images are RGB unless every
one is grey. Options live in the dataset name so that a checkpoint, which
records that name, reloads its data exactly as it was trained.

Decoding thousands of files takes seconds, so the decoded tensors are cached in
PATH/.cnnlab-cache-*.pt (or under ~/.cache/cnnlab/folders when PATH is
read-only), keyed by a fingerprint of every image's relative path, size and
modification time: adding, removing or editing an image rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cnnlab.atomicfile import atomic_open
from cnnlab.data.dataset import ImageDataset, split_validation
from cnnlab.data.images import MAX_PIXELS, load_image
from cnnlab.errors import CnnlabError

FOLDER_PREFIX = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2
_TEST_SPLIT_SEED = 20240601  # fixed: the carved test set is part of the dataset's definition
# Decoded images are held in memory as uint8; past this, ask for a smaller size rather than swap.
MAX_DECODED_BYTES = 4 * 2**30
CACHE_FORMAT = 1
_OPTION = re.compile(r",(size|channels)=([^,]*)$")


@dataclass(frozen=True)
class FolderSpec:
    """What `folder:PATH[,size=S][,channels=C]` asks for; None means "decide from the images"."""

    path: Path
    size: tuple[int, int] | None = None  # (height, width)
    channels: int | None = None

    @classmethod
    def parse(cls, name: str) -> FolderSpec:
        if not name.startswith(FOLDER_PREFIX):
            raise CnnlabError(f"'{name}' is not a folder dataset: write folder:PATH")
        rest, options = name[len(FOLDER_PREFIX) :], {}
        # Options are peeled off the end, so a comma elsewhere in PATH still works.
        while match := _OPTION.search(rest):
            options.setdefault(match.group(1), match.group(2))
            rest = rest[: match.start()]
        if not rest:
            raise CnnlabError(f"'{name}' names no folder: write folder:PATH, e.g. folder:./photos")
        size, channels = _parse_size(options.get("size"), name), _parse_channels(options.get("channels"), name)
        return cls(Path(rest).expanduser(), size, channels)

    def cache_name(self) -> str:
        size = f"{self.size[0]}x{self.size[1]}" if self.size else "auto"
        return f".cnnlab-cache-{size}-{self.channels or 'auto'}.pt"


@dataclass(frozen=True)
class FolderSplits:
    """train and test, and val when the folder has its own `val/`; skipped: files that could not be read."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    skipped: tuple[str, ...]


def read_image_folder(spec: FolderSpec, strict: bool = False) -> FolderSplits:
    """Decode the folder (or reuse its cache). images (N, C, H, W) uint8, labels (N,) int64.

    Unreadable or oversized images are skipped with one warning listing them, or
    with `strict` they are an error.
    """
    root = spec.path
    if not root.is_dir():
        raise CnnlabError(f"folder dataset {root} does not exist or is not a folder")
    try:
        listing = _list_images(root)
    except OSError as exc:
        raise CnnlabError(f"cannot read {exc.filename or root}: {exc.strerror}") from None
    fingerprint = _fingerprint(listing, spec)
    splits = _load_cache(root, spec, fingerprint)
    if splits is None:
        splits = _decode(listing, spec)
        _save_cache(root, spec, fingerprint, splits)
    if splits.skipped:
        more = len(splits.skipped) - 10
        shown = ", ".join(splits.skipped[:10]) + (f" and {more} more" if more > 0 else "")
        if strict:
            raise CnnlabError(f"{len(splits.skipped)} image(s) in {root} cannot be used: {shown}; fix or remove them")
        warnings.warn(f"skipped {len(splits.skipped)} unreadable image(s) in {root}: {shown}", stacklevel=2)
    return splits


@dataclass(frozen=True)
class _Listing:
    """The image files of a folder dataset: split -> class -> relative paths, sorted."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, dict[str, list[str]]]
    stats: list[tuple[str, int, int]]  # (relative path, size, mtime in ns) of every file, for the fingerprint


def _list_images(root: Path) -> _Listing:
    subfolders = _subfolders(root)
    if "train" in subfolders:
        others = [s for s in subfolders if s not in SPLITS]
        if others:
            raise CnnlabError(
                f"{root} has train/ and also {', '.join(others)}/: "
                "put every class folder inside train/ (and val/, test/)"
            )
        split_dirs = {s: root / s for s in SPLITS if s in subfolders}
    else:
        split_dirs = {"train": root}
    classes = tuple(_subfolders(split_dirs["train"]))
    if not classes:
        raise CnnlabError(
            f"{split_dirs['train']} has no class sub-folders: put each class's images in a folder named after it"
        )
    files: dict[str, dict[str, list[str]]] = {}
    stats: list[tuple[str, int, int]] = []
    for split, folder in split_dirs.items():
        present = _subfolders(folder)
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise CnnlabError(
                f"{folder} has class folder(s) {', '.join(unknown)} that train/ lacks: every class must be in train/"
            )
        files[split] = {}
        for name in present:
            found = _walk_images(root, folder / name, stats)
            if not found and split == "train":
                raise CnnlabError(
                    f"class folder {folder / name} holds no PNG, JPEG, BMP or WebP images: add some or remove it"
                )
            files[split][name] = found
        if split != "train" and not any(files[split].values()):
            raise CnnlabError(f"{folder} holds no images: put class folders with images in it, or remove it")
    return _Listing(root, classes, files, stats)


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _walk_images(root: Path, folder: Path, stats: list[tuple[str, int, int]]) -> list[str]:
    """Relative paths of the images under `folder`, sorted; appends each one's (path, size, mtime) to `stats`.

    Runs on every load, cache hit or not, so it stays cheap: one scandir per
    folder and one stat per file, no per-file path arithmetic.
    """
    found: list[str] = []
    pending = [(str(folder), os.path.relpath(folder, root))]
    while pending:
        path, relative = pending.pop()
        subfolders = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            # Symbolic links to folders are not followed, so a link loop cannot trap the walk.
            if entry.is_dir(follow_symlinks=False):
                subfolders.append((entry.path, f"{relative}/{entry.name}"))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                status = entry.stat()
                found.append(f"{relative}/{entry.name}")
                stats.append((found[-1], status.st_size, status.st_mtime_ns))
        pending.extend(reversed(subfolders))
    return found


def _fingerprint(listing: _Listing, spec: FolderSpec) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{spec.size}|{spec.channels}\n".encode())
    for relative, size, mtime in listing.stats:
        digest.update(f"{relative}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _decode(listing: _Listing, spec: FolderSpec) -> FolderSplits:
    paths = {split: [(p, label) for label, c in enumerate(listing.classes) for p in by_class.get(c, [])]
             for split, by_class in listing.files.items()}  # fmt: skip
    height, width = spec.size or _first_size(listing.root, paths["train"])
    count = sum(len(p) for p in paths.values())
    channels = spec.channels or 3
    if count * channels * height * width > MAX_DECODED_BYTES:
        raise CnnlabError(
            f"{count} images of {channels}x{height}x{width} need {count * channels * height * width / 2**30:.1f} GiB: "
            f"ask for a smaller size, e.g. folder:{listing.root},size=64"
        )
    skipped: list[str] = []
    shape = (channels, height, width)
    decoded = {split: _decode_split(listing.root, items, shape, skipped) for split, items in paths.items()}
    if spec.channels is None and all(_is_grey(images) for images, _ in decoded.values()):
        # Converting grey to RGB copies the grey level into all three channels, so channel 0 is the grey image.
        decoded = {split: (images[:, :1].contiguous(), labels) for split, (images, labels) in decoded.items()}
    datasets = {split: ImageDataset(images, labels, listing.classes) for split, (images, labels) in decoded.items()}
    train = datasets["train"]
    for label, name in enumerate(listing.classes):
        if not bool((train.labels == label).any()):
            raise CnnlabError(
                f"class '{name}' has no readable image in {listing.root}: fix its images or remove the folder"
            )
    test = datasets.get("test")
    if test is None:
        train, test = split_validation(train, TEST_FRACTION, _TEST_SPLIT_SEED)
    return FolderSplits(train, datasets.get("val"), test, tuple(skipped))


def _decode_split(
    root: Path, items: list[tuple[str, int]], shape: tuple[int, int, int], skipped: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, C, H, W) uint8 and labels (N,) int64 of the readable files in `items`."""
    images = torch.empty((len(items), *shape), dtype=torch.uint8)
    labels = torch.empty(len(items), dtype=torch.int64)
    n = 0
    for relative, label in items:
        try:
            images[n] = load_image(root / relative, shape)
        except CnnlabError:
            skipped.append(relative)
            continue
        labels[n] = label
        n += 1
    return images[:n].clone() if n < len(items) else images, labels[:n].clone()


def _first_size(root: Path, items: list[tuple[str, int]]) -> tuple[int, int]:
    """(height, width) of the first image whose header can be read."""
    for relative, _ in items:
        try:
            with Image.open(root / relative) as image:
                width, height = image.size
        except Exception:  # an unreadable file is skipped here and reported when decoding
            continue
        if 0 < width * height <= MAX_PIXELS:
            return height, width
    raise CnnlabError(f"no image in {root} can be read: are they PNG, JPEG, BMP or WebP files?")


def _is_grey(images: torch.Tensor) -> bool:
    return bool(torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]))


def _cache_paths(root: Path, spec: FolderSpec) -> list[Path]:
    """Beside the data first; a per-user folder when the data's folder is read-only."""
    key = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [root / spec.cache_name(), Path.home() / ".cache" / "cnnlab" / "folders" / f"{key}{spec.cache_name()}"]


def _load_cache(root: Path, spec: FolderSpec, fingerprint: str) -> FolderSplits | None:
    for path in _cache_paths(root, spec):
        if not path.is_file():
            continue
        try:
            # weights_only: the cache holds plain tensors, strings and lists, and loading it must not run code.
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != CACHE_FORMAT or payload.get("fingerprint") != fingerprint:
                continue
            classes = tuple(payload["classes"])
            parts = {s: ImageDataset(payload[f"{s}_images"], payload[f"{s}_labels"], classes)
                     for s in SPLITS if f"{s}_images" in payload}  # fmt: skip
            return FolderSplits(parts["train"], parts.get("val"), parts["test"], tuple(payload["skipped"]))
        except Exception:  # a damaged or foreign cache file is only a missed shortcut: decode again
            continue
    return None


def _save_cache(root: Path, spec: FolderSpec, fingerprint: str, splits: FolderSplits) -> None:
    payload: dict[str, object] = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "classes": list(splits.train.classes),
        "skipped": list(splits.skipped),
    }
    for split in SPLITS:
        dataset = getattr(splits, split)
        if dataset is not None:
            payload[f"{split}_images"], payload[f"{split}_labels"] = dataset.images, dataset.labels
    for path in _cache_paths(root, spec):
        try:
            with atomic_open(path) as f:
                torch.save(payload, f)
            path.chmod(0o644)  # the temporary file was private; others reading the same data may use the cache
            return
        except OSError:
            continue  # read-only: try the next place; without any, the folder is simply decoded each time


def _parse_size(text: str | None, name: str) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not match or not 1 <= int(match.group(1)) <= 4096 or not 1 <= int(match.group(2) or match.group(1)) <= 4096:
        raise CnnlabError(f"size={text} in '{name}' must be N or HxW with sides from 1 to 4096, e.g. size=32")
    return int(match.group(1)), int(match.group(2) or match.group(1))


def _parse_channels(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if text not in ("1", "3"):
        raise CnnlabError(f"channels={text} in '{name}' must be 1 (grey) or 3 (RGB)")
    return int(text)
