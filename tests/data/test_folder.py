import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from cnnlab.data import folder as folder_module
from cnnlab.data.folder import FolderSpec, read_image_folder
from cnnlab.data.sources import get_source, load_splits, normalization_for
from cnnlab.errors import CnnlabError

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def make_folder(root, per_class=10, size=(12, 10), mode="RGB", suffix=".png"):
    """One sub-folder per class; class k's images are its colour, with a brightness ramp by index."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            value = colour if mode == "RGB" else 20 * (1 + list(COLOURS).index(name))
            Image.new(mode, size, value).save(root / name / f"{i:03d}{suffix}")
    return root


def huge_png_header(width, height) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data to back it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_a_class_per_folder_gives_sorted_classes_and_a_fixed_stratified_test_split(tmp_path):
    make_folder(tmp_path)
    splits = load_splits(f"folder:{tmp_path}", None, val_fraction=0.2, seed=0)
    assert splits.classes == ("blue", "green", "red")
    assert splits.image_shape == (3, 10, 12)  # the first image's size, (C, H, W)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    assert torch.bincount(splits.test.labels).tolist() == [2, 2, 2]
    red = splits.train.images[splits.train.labels == 2]
    assert red[:, 0].eq(255).all() and red[:, 1:].eq(0).all()
    again = load_splits(f"folder:{tmp_path}", None, val_fraction=0.2, seed=5)
    assert torch.equal(again.test.images, splits.test.images)  # the test split does not depend on the seed


def test_size_and_channels_options(tmp_path):
    make_folder(tmp_path)
    splits = load_splits(f"folder:{tmp_path},size=16x8,channels=1", None, 0.1, 0)
    assert splits.image_shape == (1, 16, 8)
    assert load_splits(f"folder:{tmp_path},size=20", None, 0.1, 0).image_shape == (3, 20, 20)


def test_all_grey_images_give_one_channel(tmp_path):
    make_folder(tmp_path, mode="L", suffix=".bmp")
    splits = load_splits(f"folder:{tmp_path}", None, 0.1, 0)
    assert splits.image_shape == (1, 10, 12)
    assert set(splits.train.images.unique().tolist()) == {20, 40, 60}


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".bmp", ".webp", ".PNG"])
def test_common_formats_are_read(tmp_path, suffix):
    make_folder(tmp_path, per_class=2, suffix=suffix)
    (tmp_path / "red" / "notes.txt").write_text("not an image, ignored")
    splits = load_splits(f"folder:{tmp_path}", None, 0.0, 0)
    assert len(splits.train) + len(splits.test) == 6


def test_train_val_test_folders_are_used_as_given(tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / split, per_class=count)
    splits = load_splits(f"folder:{tmp_path}", None, val_fraction=0.5, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 9)


def test_train_without_test_carves_the_test_split_and_keeps_val(tmp_path):
    make_folder(tmp_path / "train", per_class=10)
    make_folder(tmp_path / "val", per_class=1)
    splits = load_splits(f"folder:{tmp_path}", None, 0.1, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 3, 6)


def test_evaluation_gets_the_same_test_split(tmp_path):
    make_folder(tmp_path)
    train, test = get_source(f"folder:{tmp_path}").load(None)
    assert torch.equal(test.images, load_splits(f"folder:{tmp_path}", None, 0.1, 0).test.images)


def test_normalization_comes_from_the_folder_train_split(tmp_path):
    make_folder(tmp_path)
    splits = load_splits(f"folder:{tmp_path}", None, 0.2, 0)
    expected = splits.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert normalization_for(splits).mean == pytest.approx(expected.tolist(), rel=1e-6)


def test_unreadable_and_oversized_images_are_skipped_with_one_warning(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "green" / "huge.png").write_bytes(huge_png_header(100_000, 100_000))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*green/huge.png.*red/broken.png"):
        splits = load_splits(f"folder:{tmp_path}", None, 0.0, 0)
    assert len(splits.train) + len(splits.test) == 30
    with pytest.raises(CnnlabError, match=r"2 image\(s\) in .* cannot be used: green/huge.png, red/broken.png"):
        load_splits(f"folder:{tmp_path}", None, 0.0, 0, strict=True)  # also from the cache


@pytest.mark.parametrize(
    "arrange, message",
    [
        (lambda root: (root / "empty").mkdir(), r"class folder .*empty holds no PNG"),
        (lambda root: None, "has no class sub-folders"),
        (lambda root: make_folder(root / "train") and (root / "stray").mkdir(), "has train/ and also stray/"),
        (lambda root: make_folder(root / "train") and make_folder(root / "test") and (root / "test" / "cat").mkdir(),
         "class folder\\(s\\) cat that train/ lacks"),
        (lambda root: make_folder(root / "train") and (root / "test").mkdir(), "test holds no images"),
    ],
)  # fmt: skip
def test_folder_mistakes_are_clear_errors(tmp_path, arrange, message):
    root = tmp_path / "data"
    root.mkdir()
    if "empty" in message:
        make_folder(root)
    arrange(root)
    with pytest.raises(CnnlabError, match=message):
        load_splits(f"folder:{root}", None, 0.1, 0)


def test_a_class_with_only_unreadable_images_is_an_error(tmp_path):
    make_folder(tmp_path)
    for path in (tmp_path / "red").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(CnnlabError, match="class 'red' has no readable image"):
        load_splits(f"folder:{tmp_path}", None, 0.1, 0)


def test_a_missing_folder_and_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(CnnlabError, match="does not exist"):
        load_splits(f"folder:{tmp_path / 'nope'}", None, 0.1, 0)
    with pytest.raises(CnnlabError, match="size=0 .* must be N or HxW"):
        FolderSpec.parse(f"folder:{tmp_path},size=0")
    with pytest.raises(CnnlabError, match="channels=2 .* must be 1"):
        FolderSpec.parse(f"folder:{tmp_path},channels=2")
    with pytest.raises(CnnlabError, match="names no folder"):
        FolderSpec.parse("folder:")


def test_options_are_peeled_off_the_end_so_commas_in_paths_work(tmp_path):
    spec = FolderSpec.parse("folder:my,photos,size=32x48,channels=1")
    assert (str(spec.path), spec.size, spec.channels) == ("my,photos", (32, 48), 1)


def test_the_decoded_folder_is_cached_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    """50 images: the second load decodes nothing; adding, touching or removing an image decodes again."""
    make_folder(tmp_path, per_class=17)
    (tmp_path / "red" / "016.png").unlink()
    decoded = []
    real_load = folder_module.load_image
    monkeypatch.setattr(folder_module, "load_image", lambda path, shape: decoded.append(path) or real_load(path, shape))
    name = f"folder:{tmp_path}"

    first = load_splits(name, None, 0.1, 0)
    assert len(decoded) == 50 and list(tmp_path.glob(".cnnlab-cache-*.pt"))
    second = load_splits(name, None, 0.1, 0)
    assert len(decoded) == 50  # nothing decoded: the cache answered
    assert torch.equal(first.train.images, second.train.images) and first.classes == second.classes

    Image.new("RGB", (12, 10), (9, 9, 9)).save(tmp_path / "red" / "new.png")
    grown = load_splits(name, None, 0.1, 0)
    assert len(grown.train) + len(grown.val) + len(grown.test) == 51 and len(decoded) == 101

    stamp = os.stat(tmp_path / "blue" / "000.png").st_mtime_ns + 10**9
    os.utime(tmp_path / "blue" / "000.png", ns=(stamp, stamp))
    load_splits(name, None, 0.1, 0)
    assert len(decoded) == 152

    load_splits(f"{name},size=8", None, 0.1, 0)  # other options: their own cache
    assert len(decoded) == 203
    load_splits(name, None, 0.1, 0)
    assert len(decoded) == 203


def test_a_damaged_cache_is_rebuilt(tmp_path):
    make_folder(tmp_path, per_class=2)
    first = load_splits(f"folder:{tmp_path}", None, 0.0, 0)
    (cache,) = tmp_path.glob(".cnnlab-cache-*.pt")
    cache.write_bytes(b"not a torch file")
    again = load_splits(f"folder:{tmp_path}", None, 0.0, 0)
    assert torch.equal(first.train.images, again.train.images)


def test_a_read_only_folder_is_cached_in_the_home_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", per_class=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_open = folder_module.atomic_open

    def refuse_data_folder(path):
        if (tmp_path / "data") in path.parents:
            raise PermissionError(13, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(folder_module, "atomic_open", refuse_data_folder)
    read_image_folder(FolderSpec.parse(f"folder:{tmp_path / 'data'}"))
    assert not list((tmp_path / "data").glob(".cnnlab-cache-*"))
    assert len(list((tmp_path / "home" / ".cache" / "cnnlab" / "folders").glob("*.pt"))) == 1


def test_too_many_pixels_ask_for_a_smaller_size(tmp_path, monkeypatch):
    make_folder(tmp_path, per_class=2)
    monkeypatch.setattr(folder_module, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(CnnlabError, match=r"ask for a smaller size, e.g. folder:.*,size=64"):
        load_splits(f"folder:{tmp_path}", None, 0.1, 0)
