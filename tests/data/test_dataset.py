import pytest
import torch

from cnnlab.data.dataset import ImageDataset, Normalization, split_validation
from cnnlab.errors import CnnlabError

CLASSES = ("a", "b", "c")


def make_dataset(n_per_class=(30, 20, 10)) -> ImageDataset:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(labels), 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageDataset(images, labels, CLASSES)


def test_rejects_labels_outside_the_classes():
    with pytest.raises(CnnlabError, match="labels run from 0 to 3 but there are 3 classes"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 3]), CLASSES)


def test_rejects_wrong_dtypes_and_shapes():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), CLASSES)
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0]), CLASSES)


def test_validation_split_is_stratified_disjoint_and_complete():
    data = make_dataset()
    train, val = split_validation(data, 0.2, seed=1)
    assert torch.bincount(val.labels).tolist() == [6, 4, 2]
    assert torch.bincount(train.labels).tolist() == [24, 16, 8]
    # Each image lands in exactly one part: compare the multisets of whole images.
    rows = lambda d: sorted(map(tuple, d.images.flatten(1).tolist()))  # noqa: E731
    assert sorted(rows(train) + rows(val)) == rows(data)


def test_validation_split_depends_on_the_seed_only():
    data = make_dataset()
    a, _ = split_validation(data, 0.2, seed=1)
    b, _ = split_validation(data, 0.2, seed=1)
    c, _ = split_validation(data, 0.2, seed=2)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_zero_fraction_leaves_an_empty_validation_split():
    train, val = split_validation(make_dataset(), 0.0, seed=0)
    assert len(train) == 60 and len(val) == 0


def test_normalization_gives_zero_mean_unit_std_on_its_own_data():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    norm = Normalization.of(images)
    x = norm.apply(images)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def reference_normalization(norm, images):
    """PyTorch's operators, one after another: the arithmetic the compiled pass must match bit for bit."""
    scale = torch.tensor([1 / (255 * s) for s in norm.std], dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(norm.mean, norm.std)], dtype=torch.float32).view(1, -1, 1, 1)
    return images.to(torch.float32) * scale - shift


def test_normalization_gathers_the_indexed_images_bit_for_bit():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    norm = Normalization((0.3, 0.5, 0.2), (0.25, 0.3, 0.35))
    index = torch.tensor([49, 0, 7, 7, 23])  # any order, repeats allowed
    assert torch.equal(norm.apply(images, index), reference_normalization(norm, images[index]))
    assert torch.equal(norm.apply(images), reference_normalization(norm, images))
    strided = images.transpose(2, 3)  # a non-contiguous view normalizes as its values
    assert torch.equal(norm.apply(strided, index), reference_normalization(norm, strided[index]))
    assert norm.apply(images, torch.tensor([], dtype=torch.int64)).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("bad", [50, -1])
def test_normalization_refuses_an_index_outside_the_images(bad):
    images = torch.zeros(50, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(IndexError, match="out of range"):
        Normalization((0.5,), (0.25,)).apply(images, torch.tensor([0, bad]))


def test_normalization_round_trips_through_a_dict():
    norm = Normalization((0.1, 0.2), (0.3, 0.4))
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_constant_images_do_not_divide_by_zero():
    norm = Normalization.of(torch.full((4, 1, 2, 2), 7, dtype=torch.uint8))
    assert torch.isfinite(norm.apply(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))).all()
