import pytest
import torch
from torch import nn

from dinv import models

CIFAR_NAMES = ["resnet18_cifar", "resnet34_cifar", "vgg11_bn_cifar"]
DIGITS_NAMES = ["digits_net", "digits_student"]


def input_for(name, batch):
    shape = (batch, 1, 16, 16) if name.startswith("digits") else (batch, 3, 32, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def digits_test():
    return models.load_digits("test")


def test_names_cover_the_builtin_models():
    assert set(models.names()) == set(CIFAR_NAMES + DIGITS_NAMES)


@pytest.mark.parametrize("name", CIFAR_NAMES + DIGITS_NAMES)
def test_forward_shape(name):
    model = models.create(name)
    batch = 4 if name.startswith("digits") else 2
    with torch.no_grad():
        assert model(input_for(name, batch)).shape == (batch, 10)


@pytest.mark.parametrize("name", CIFAR_NAMES + DIGITS_NAMES)
def test_num_classes_sets_the_output_width(name):
    with torch.no_grad():
        assert models.create(name, num_classes=7).eval()(input_for(name, 2)).shape == (2, 7)


@pytest.mark.parametrize("name", CIFAR_NAMES + DIGITS_NAMES)
def test_every_model_has_batchnorm(name):
    # DeepInversion's feature-statistics loss hooks the BatchNorm layers; a model without any
    # would give it nothing to match.
    assert any(isinstance(m, nn.BatchNorm2d) for m in models.create(name).modules())


def test_student_is_smaller_than_teacher():
    def count(name):
        return sum(p.numel() for p in models.create(name).parameters())

    assert count("digits_student") < count("digits_net") <= 300_000


def test_torchvision_passthrough_is_untrained_with_given_classes():
    torch.manual_seed(0)
    model = models.create("torchvision:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert model(input_for("resnet18", 2)).shape == (2, 10)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Fresh BatchNorm statistics: nothing was loaded.
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("resnet1000_cifar")


def test_load_digits_split_sizes_and_normalization():
    train_images, train_labels = models.load_digits("train")
    test_images, test_labels = models.load_digits("test")
    all_images, all_labels = models.load_digits("all")
    assert train_images.shape == (1347, 1, 16, 16) and train_labels.shape == (1347,)
    assert test_images.shape == (450, 1, 16, 16) and test_labels.shape == (450,)
    assert all_images.shape == (1797, 1, 16, 16) and all_labels.shape == (1797,)
    assert train_images.dtype == torch.float32 and train_labels.dtype == torch.int64
    assert abs(train_images.mean().item()) < 0.01
    assert abs(train_images.std().item() - 1) < 0.01
    # Stratified: every class is in both splits in about its overall proportion.
    assert (test_labels.bincount(minlength=10) >= 40).all()
    # Pixels lie in [0, 1] before normalization.
    pixels = all_images * models.DIGITS_STD[0] + models.DIGITS_MEAN[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_load_digits_split_is_fixed_and_disjoint():
    first, _ = models.load_digits("test")
    again, _ = models.load_digits("test")
    assert torch.equal(first, again)
    train, _ = models.load_digits("train")
    flat_train = {tuple(row) for row in train.flatten(1).tolist()}
    assert not any(tuple(row) in flat_train for row in first.flatten(1).tolist())


def test_load_digits_other_size_and_bad_split():
    images, _ = models.load_digits("test", size=8)
    assert images.shape == (450, 1, 8, 8)
    with pytest.raises(ValueError):
        models.load_digits("validation")


def test_shipped_teacher_reaches_97_percent(digits_test):
    teacher = models.load_digits_teacher()
    assert not teacher.training
    assert models.accuracy(teacher, *digits_test) >= 0.97


def test_train_classifier_teaches_the_student(digits_test):
    train_images, train_labels = models.load_digits("train")
    torch.manual_seed(0)
    student = models.create("digits_student")
    models.train_classifier(student, train_images, train_labels, epochs=2, seed=0)
    assert not student.training
    assert models.accuracy(student, *digits_test) >= 0.6
