"""Model zoo: the digits demo's teacher and student, CIFAR-sized ResNets and VGG, and any
torchvision classifier, all by name.

    from dinv import models
    teacher = models.load_digits_teacher()            # trained, eval mode
    student = models.create("digits_student")
    net = models.create("resnet34_cifar", num_classes=100)
    big = models.create("torchvision:resnet50")       # untrained (weights=None)

A trained teacher from a file, in eval mode on the CPU (`map_location=` moves it):

    teacher = models.load_teacher("digits")                        # the shipped one
    teacher = models.load_teacher("rn34.pt", arch="resnet34_cifar")  # a state_dict file
    teacher = models.load_teacher("rn50.pt", arch="torchvision:resnet50")
    teacher = models.load_teacher("whole.pt", trust_pickle=True)   # a pickled nn.Module

`load_teacher` reads with `torch.load(weights_only=True)` and unpickles a whole model (or any
other Python object) only with trust_pickle=True, since unpickling can run arbitrary code. A
state_dict may be nested under "state_dict", "model_state_dict", "model" or "net", carry
DataParallel/DDP's "module." or torch.compile's "_orig_mod." prefix, and have another class count
(read from the classifier's weight when num_classes is None); it is loaded strictly, and a
mismatch raises ValueError naming the file, the arch and the first missing/unexpected keys.
`arch` is a name from `names()`, "torchvision:<name>", or "timm:<name>" (needs timm).

The CIFAR ResNets have the module names and forward of the DeepInversion reference's
(NVlabs/DeepInversion cifar10/resnet_cifar.py, from DAFL), so its ResNet18/ResNet34 checkpoints
load unchanged into "resnet18_cifar" / "resnet34_cifar".
"""
from __future__ import annotations

from .checkpoints import TIMM_PREFIX, load_teacher
from .cifar import CifarResNet, CifarVGG, resnet18_cifar, resnet34_cifar, vgg11_bn_cifar
from .digits import DigitsNet, DigitsStudent
from .registry import DIGITS_TEACHER_WEIGHTS, TORCHVISION_PREFIX, create, load_digits_teacher, names

__all__ = [
    "DIGITS_TEACHER_WEIGHTS", "CifarResNet", "CifarVGG", "DigitsNet", "DigitsStudent",
    "TIMM_PREFIX", "TORCHVISION_PREFIX", "create", "load_digits_teacher", "load_teacher", "names",
    "resnet18_cifar", "resnet34_cifar", "vgg11_bn_cifar",
]
