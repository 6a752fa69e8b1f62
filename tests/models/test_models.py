import pytest
import torch
from torch import nn

from dinv import models

CIFAR_NAMES = ["resnet18_cifar", "resnet34_cifar", "vgg11_bn_cifar"]
DIGITS_NAMES = ["digits_net", "digits_student"]


def input_for(name, batch):
    shape = (batch, 1, 16, 16) if name.startswith("digits") else (batch, 3, 32, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


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


