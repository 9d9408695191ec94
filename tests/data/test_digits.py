import torch

from cnnlab.data.digits import load_digits_splits


def test_digits_are_28x28_grey_with_ten_classes_and_a_fixed_split():
    train, test = load_digits_splits()
    assert train.image_shape == (1, 28, 28) and test.image_shape == (1, 28, 28)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.classes == tuple(str(d) for d in range(10))
    # Stratified: every class is in the test split in about its overall share.
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again_train, again_test = load_digits_splits()
    assert torch.equal(test.images, again_test.images) and torch.equal(train.labels, again_train.labels)


def test_digits_keep_an_empty_border_and_use_the_full_grey_range():
    train, _ = load_digits_splits()
    assert train.images[:, :, :2, :].max() == 0 and train.images[:, :, :, -2:].max() == 0
    assert train.images.max() == 255
