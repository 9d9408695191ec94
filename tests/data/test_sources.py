import gzip

import pytest
import torch

from cnnlab.data import sources
from cnnlab.data.sources import data_roots, get_source, load_splits, normalization_for
from cnnlab.errors import CnnlabError
from tests.conftest import write_mnist_folder


def test_data_dir_is_the_only_folder_else_the_environment_or_the_cache_then_the_system(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    assert data_roots(tmp_path / "flag") == [tmp_path / "flag"]
    assert data_roots(None) == [tmp_path / "env", sources.SYSTEM_DATA_DIR]
    monkeypatch.delenv("CNNLAB_DATA")
    assert data_roots(None)[0].parts[-3:] == (".cache", "cnnlab", "data")


def test_mnist_loads_from_a_hand_built_folder_with_a_validation_split(mnist_root):
    splits = load_splits("mnist", mnist_root, val_fraction=0.1, seed=0)
    assert splits.image_shape == (1, 28, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)  # 6 per class, 1 of each held out
    assert splits.classes == tuple(str(d) for d in range(10))


def test_raw_and_gzip_files_are_both_found(tmp_path):
    write_mnist_folder(tmp_path / "mnist", compress=False)
    raw = load_splits("mnist", tmp_path, 0.0, 0)
    write_mnist_folder(tmp_path / "gz" / "mnist", compress=True)
    zipped = load_splits("mnist", tmp_path / "gz", 0.0, 0)
    assert torch.equal(raw.train.images, zipped.train.images)


def test_environment_variable_points_at_the_data(mnist_root, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(mnist_root))
    assert get_source("mnist").find(None) == mnist_root / "mnist"


def test_missing_files_say_where_cnnlab_looked_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "empty"))
    with pytest.raises(CnnlabError, match=r"dataset 'mnist' not found \(looked in .*empty/mnist.*\): put the four IDX"):
        load_splits("mnist", None, 0.1, 0)


def test_a_folder_missing_one_file_is_not_taken(mnist_root, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("CNNLAB_DATA", str(mnist_root))
    (mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CnnlabError, match="not found"):
        load_splits("mnist", None, 0.1, 0)


@pytest.fixture
def system_mnist(tmp_path, monkeypatch):
    """A complete mnist in the system folder: what a --data-dir that lacks files used to fall back to."""
    write_mnist_folder(tmp_path / "system" / "mnist")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")


def test_a_data_dir_without_the_dataset_folder_is_an_error_not_a_fallback(tmp_path, system_mnist):
    with pytest.raises(CnnlabError, match=r"--data-dir .*/missing has no folder 'mnist': .*/missing/mnist does not"):
        load_splits("mnist", tmp_path / "missing", 0.1, 0)
    write_mnist_folder(tmp_path / "flat")
    with pytest.raises(CnnlabError, match="holds the files itself: pass its parent folder"):
        load_splits("mnist", tmp_path / "flat", 0.1, 0)


def test_a_data_dir_missing_one_idx_file_names_the_folder_and_the_file(mnist_root, system_mnist):
    (mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CnnlabError, match=r"data/mnist lacks t10k-labels-idx1-ubyte \(.gz or raw\)"):
        load_splits("mnist", mnist_root, 0.1, 0)


def test_train_with_a_wrong_data_dir_exits_2_and_leaves_no_run(tmp_path, system_mnist, capsys):
    from cnnlab.cli import main

    runs = tmp_path / "runs"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--runs-dir", str(runs)]) == 2
    assert "has no folder 'mnist'" in capsys.readouterr().err
    assert not runs.exists()


def test_label_count_mismatch_in_a_dataset_folder(mnist_root):
    labels = mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(data[:4] + (19).to_bytes(4, "big") + data[8:-1]))
    with pytest.raises(CnnlabError, match="20 images but .* 19 labels"):
        load_splits("mnist", mnist_root, 0.1, 0)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(CnnlabError, match="unknown dataset 'nope': choose one of .*digits.*mnist"):
        get_source("nope")


def test_normalization_comes_from_the_train_split_only(mnist_root):
    splits = load_splits("mnist", mnist_root, 0.1, 0)
    norm = normalization_for(splits)
    expected = splits.train.images.double().div(255)
    assert norm.mean[0] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert norm.std[0] == pytest.approx(expected.std(unbiased=False).item(), rel=1e-6)


def test_fashion_mnist_from_the_system_package(require_fashion_mnist):
    splits = load_splits("fashion-mnist", None, 0.1, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
