"""dinv.datasets: the bundled digits and class selection."""
import pytest
import torch

from dinv.datasets import DIGITS_MEAN, DIGITS_STD, load_digits, select_classes


def test_load_digits_split_sizes_and_normalization():
    train_images, train_labels = load_digits("train")
    test_images, test_labels = load_digits("test")
    all_images, all_labels = load_digits("all")
    assert train_images.shape == (1347, 1, 16, 16) and train_labels.shape == (1347,)
    assert test_images.shape == (450, 1, 16, 16) and test_labels.shape == (450,)
    assert all_images.shape == (1797, 1, 16, 16) and all_labels.shape == (1797,)
    assert train_images.dtype == torch.float32 and train_labels.dtype == torch.int64
    assert abs(train_images.mean().item()) < 0.01
    assert abs(train_images.std().item() - 1) < 0.01
    # Stratified: every class is in both splits in about its overall proportion.
    assert (test_labels.bincount(minlength=10) >= 40).all()
    # Pixels lie in [0, 1] before normalization.
    pixels = all_images * DIGITS_STD[0] + DIGITS_MEAN[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_load_digits_split_is_fixed_and_disjoint():
    first, _ = load_digits("test")
    again, _ = load_digits("test")
    assert torch.equal(first, again)
    train, _ = load_digits("train")
    flat_train = {tuple(row) for row in train.flatten(1).tolist()}
    assert not any(tuple(row) in flat_train for row in first.flatten(1).tolist())


def test_load_digits_other_size_and_bad_split():
    images, _ = load_digits("test", size=8)
    assert images.shape == (450, 1, 8, 8)
    with pytest.raises(ValueError):
        load_digits("validation")


def test_select_classes_keeps_only_those_labels():
    images, labels = load_digits("test")
    some, their = select_classes(images, labels, [3, 7])
    assert set(their.tolist()) == {3, 7} and len(some) == len(their)
    assert len(their) == int(((labels == 3) | (labels == 7)).sum())
