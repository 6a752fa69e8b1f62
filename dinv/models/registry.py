"""The built-in model registry: names -> constructors, torchvision passthrough, and the shipped
digits teacher."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .cifar import resnet18_cifar, resnet34_cifar, vgg11_bn_cifar
from .digits import DigitsNet, DigitsStudent

TORCHVISION_PREFIX = "torchvision:"
DIGITS_TEACHER_WEIGHTS = Path(__file__).parent / "weights" / "digits_net.pt"

_BUILDERS = {
    "digits_net": DigitsNet,
    "digits_student": DigitsStudent,
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
    "vgg11_bn_cifar": vgg11_bn_cifar,
}


def names() -> list:
    """The built-in model names; any "torchvision:<name>" is accepted by `create` too."""
    return sorted(_BUILDERS)


def create(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """A freshly initialized model. num_classes=None keeps the model's own default (10 for the
    built-in ones, 1000 for torchvision's ImageNet classifiers); kwargs go to the constructor."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith(TORCHVISION_PREFIX):
        # Imported here so that the built-in models do not need torchvision.
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION_PREFIX):], weights=None, **kwargs)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; built-in: {', '.join(names())}, "
                         f"or {TORCHVISION_PREFIX}<torchvision model name>")
    return _BUILDERS[name](**kwargs)


def load_digits_teacher() -> DigitsNet:
    """The shipped DigitsNet trained by examples/train_digits_teacher.py, on the CPU, in eval mode.
    It expects `dinv.datasets.load_digits`' inputs: [N, 1, 16, 16] normalized with
    DIGITS_MEAN / DIGITS_STD."""
    model = DigitsNet()
    model.load_state_dict(torch.load(DIGITS_TEACHER_WEIGHTS, map_location="cpu",
                                     weights_only=True))
    return model.eval()
