"""Where each named dataset comes from: the registry behind `--dataset NAME`.

A source knows how to find its files and read them into (train, test)
`ImageDataset`s. Datasets that live on disk are looked for, in order, in
`--data-dir`, `$CNNLAB_DATA`, `~/.cache/cnnlab/data`, and the system dataset
folder (`/usr/share/datasets`, where Debian's dataset packages put them), each
in a sub-folder named after the dataset. `cnnlab datasets --download NAME`
puts them in the first of those folders.

`folder:PATH` names a user's own image folder (see `cnnlab.data.folder`); it is
not registered, since PATH is part of the name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cnnlab.data.cifar import CIFAR10_UNPACKED, CIFAR100_UNPACKED, read_cifar10, read_cifar100
from cnnlab.data.dataset import DatasetSplits, ImageDataset, Normalization, split_validation
from cnnlab.data.digits import load_digits_splits
from cnnlab.data.folder import FOLDER_PREFIX, FolderSpec, FolderSplits, read_image_folder
from cnnlab.data.idx import read_idx_pair
from cnnlab.errors import CnnlabError

SYSTEM_DATA_DIR = Path("/usr/share/datasets")


def data_roots(data_dir: Path | None) -> list[Path]:
    """The folders searched for dataset sub-folders, first match wins.

    A folder the user names (`--data-dir`) is the only one: falling back to another
    would train on data the user did not ask for.
    """
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("CNNLAB_DATA"):
        roots = [Path(os.environ["CNNLAB_DATA"])]
    else:
        roots = [Path.home() / ".cache" / "cnnlab" / "data"]
    return roots + [SYSTEM_DATA_DIR]


@dataclass(frozen=True)
class DatasetSource:
    """A named dataset.

    files:   file names that must all be present in the dataset's folder (empty
             for datasets that need none); what `--download` fetches
    read:    folder -> (train, test); the folder is None when `files` is empty
    how_to_get: one sentence for users who do not have the files
    unpacked: file names that serve instead of `files`, such as the contents
             of an archive the user has already unpacked
    """

    name: str
    description: str
    files: tuple[str, ...]
    read: Callable[[Path | None], tuple[ImageDataset, ImageDataset]]
    how_to_get: str = ""
    unpacked: tuple[str, ...] = ()

    def find(self, data_dir: Path | None) -> Path | None:
        """The first folder holding all of `files` (a `.gz` or raw copy of each) or all of `unpacked`, or None."""
        for root in data_roots(data_dir):
            folder = root / self.name
            if _all_present(folder, self.files) or (self.unpacked and _all_present(folder, self.unpacked)):
                return folder
        return None

    def load(self, data_dir: Path | None) -> tuple[ImageDataset, ImageDataset]:
        if not self.files:
            return self.read(None)
        if data_dir is not None:
            self._check_named_folder(Path(data_dir))
        folder = self.find(data_dir)
        if folder is None:
            searched = ", ".join(str(r / self.name) for r in data_roots(data_dir))
            raise CnnlabError(f"dataset '{self.name}' not found (looked in {searched}): {self.how_to_get}")
        return self.read(folder)


    def _check_named_folder(self, data_dir: Path) -> None:
        """Raise a CnnlabError naming what `--data-dir` lacks: the dataset's folder, or which of its files."""
        folder = data_dir / self.name
        if not folder.is_dir():
            hint = " (it holds the files itself: pass its parent folder)" if _all_present(data_dir, self.files) else ""
            raise CnnlabError(
                f"--data-dir {data_dir} has no folder '{self.name}'{hint}: {folder} does not exist; {self.how_to_get}"
            )
        missing = [name for name in self.files if _find_file(folder, name) is None]
        if missing and not (self.unpacked and _all_present(folder, self.unpacked)):
            forms = "or its unpacked files" if self.unpacked else ".gz or raw"
            raise CnnlabError(f"{folder} lacks {', '.join(missing)} ({forms}): {self.how_to_get}")


_SOURCES: dict[str, DatasetSource] = {}


def register_source(source: DatasetSource) -> DatasetSource:
    _SOURCES[source.name] = source
    return source


def all_sources() -> list[DatasetSource]:
    return list(_SOURCES.values())


def get_source(name: str, strict: bool = False) -> DatasetSource:
    """The source called `name`; `folder:PATH` builds one for that folder (`strict`: fail on bad images)."""
    if name.startswith(FOLDER_PREFIX):
        spec = FolderSpec.parse(name)
        return DatasetSource(
            name,
            f"images in {spec.path}, one sub-folder per class",
            (),
            lambda _folder: _train_and_test(read_image_folder(spec, strict)),
        )
    if name not in _SOURCES:
        known = ", ".join(sorted(_SOURCES))
        raise CnnlabError(f"unknown dataset '{name}': choose one of {known}, or folder:PATH")
    return _SOURCES[name]


def load_splits(
    name: str, data_dir: Path | None, val_fraction: float, seed: int, strict: bool = False
) -> DatasetSplits:
    """Read dataset `name` and carve the validation split from its training part.

    An image folder with its own `val/` keeps that split instead, and `val_fraction`
    is not used. `strict` makes an unreadable image in a folder dataset an error
    rather than a skipped file.
    """
    val = None
    if name.startswith(FOLDER_PREFIX):
        folder = read_image_folder(FolderSpec.parse(name), strict)
        train, val, test = folder.train, folder.val, folder.test
    else:
        train, test = get_source(name).load(data_dir)
    if train.image_shape != test.image_shape:
        raise CnnlabError(f"dataset '{name}': train images are {train.image_shape} but test images {test.image_shape}")
    if val is None:
        train, val = split_validation(train, val_fraction, seed)
    return DatasetSplits(name, train, val, test)


def normalization_for(splits: DatasetSplits) -> Normalization:
    """Statistics of the training split only: the test set never informs training."""
    return Normalization.of(splits.train.images)


def _train_and_test(folder: FolderSplits) -> tuple[ImageDataset, ImageDataset]:
    return folder.train, folder.test


def _all_present(folder: Path, names: tuple[str, ...]) -> bool:
    return all(_find_file(folder, f) is not None for f in names)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _idx_reader(classes: tuple[str, ...]) -> Callable[[Path | None], tuple[ImageDataset, ImageDataset]]:
    def read(folder: Path | None) -> tuple[ImageDataset, ImageDataset]:
        assert folder is not None
        splits = []
        for prefix in ("train", "t10k"):
            images, labels = read_idx_pair(
                _find_file(folder, f"{prefix}-images-idx3-ubyte"), _find_file(folder, f"{prefix}-labels-idx1-ubyte")
            )
            splits.append(ImageDataset(images, labels, classes))
        return splits[0], splits[1]

    return read


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# The romanized names the KMNIST authors give the ten characters.
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")

register_source(
    DatasetSource(
        "digits",
        "scikit-learn's 8x8 handwritten digits, upscaled to 28x28 (1,438 train / 359 test); built in",
        (),
        lambda _folder: load_digits_splits(),
    )
)
register_source(
    DatasetSource(
        "mnist",
        "handwritten digits, 28x28 grey (60,000 train / 10,000 test)",
        IDX_FILES,
        _idx_reader(tuple(str(d) for d in range(10))),
        "put the four IDX files (.gz or raw) in a folder named 'mnist' under --data-dir, "
        "or run `cnnlab datasets --download mnist`",
    )
)
register_source(
    DatasetSource(
        "fashion-mnist",
        "Zalando's clothing images, 28x28 grey (60,000 train / 10,000 test)",
        IDX_FILES,
        _idx_reader(FASHION_CLASSES),
        "install Debian's package (apt-get install dataset-fashion-mnist), put the four IDX files "
        "in a folder named 'fashion-mnist' under --data-dir, or run `cnnlab datasets --download fashion-mnist`",
    )
)
register_source(
    DatasetSource(
        "kmnist",
        "Kuzushiji-MNIST, cursive Japanese characters, 28x28 grey (60,000 train / 10,000 test)",
        IDX_FILES,
        _idx_reader(KMNIST_CLASSES),
        "put the four IDX files (.gz or raw) in a folder named 'kmnist' under --data-dir, "
        "or run `cnnlab datasets --download kmnist`",
    )
)
register_source(
    DatasetSource(
        "cifar10",
        "CIFAR-10, small colour photos in 10 classes, 3x32x32 (50,000 train / 10,000 test)",
        ("cifar-10-python.tar.gz",),
        read_cifar10,
        "put cifar-10-python.tar.gz (or its unpacked cifar-10-batches-py folder) in a folder named "
        "'cifar10' under --data-dir, or run `cnnlab datasets --download cifar10`",
        unpacked=CIFAR10_UNPACKED,
    )
)
register_source(
    DatasetSource(
        "cifar100",
        "CIFAR-100, small colour photos in 100 classes, 3x32x32 (50,000 train / 10,000 test)",
        ("cifar-100-python.tar.gz",),
        read_cifar100,
        "put cifar-100-python.tar.gz (or its unpacked cifar-100-python folder) in a folder named "
        "'cifar100' under --data-dir, or run `cnnlab datasets --download cifar100`",
        unpacked=CIFAR100_UNPACKED,
    )
)
