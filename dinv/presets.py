"""Inversion settings that work for the models dinv knows.

DIGITS: for the shipped digits teacher (16×16 grayscale): the coefficients of the eager
reference's digits run (r_feature 0.05, first BN ×10, TV-L2 1e-4, L2 1e-5, lr 0.1, jitter 2,
500 iterations), whose images teach a 98.5 % student, with the jitter as a shift that pads with
the background instead of a roll (a roll wraps strokes across the border and splits the 0s).
Flips are off on purpose: they are a prior about the domain, and mirrored digits are other
shapes (shared DESIGN notes: a student distilled from flipped digits lost 7–25 points).
IMAGENET: the reference script's defaults (ResNet-50, 224 px, setting 0).
CIFAR10: NVlabs' cifar10/deepinversion_cifar10.py with the README's improved parameters (32 px,
r_feature 10, lr 0.1, TV-L2 1e-3, no L2 prior, jitter 2, 2000 iterations), used for the
`*_cifar` architectures.
"""
from __future__ import annotations

from .datasets import DIGITS_MEAN, DIGITS_STD
from .imaging import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = dict(image_shape=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, setting_id=0,
                iterations=None, lr=0.25, r_feature=0.01, first_bn_multiplier=10.0, tv_l2=1e-4,
                tv_l1=0.0, l2=1e-5, jitter=30, flip=True)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10 = dict(image_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, setting_id=2,
               iterations=2000, lr=0.1, r_feature=10.0, first_bn_multiplier=1.0, tv_l2=1e-3,
               tv_l1=0.0, l2=0.0, jitter=2, flip=False, adi_temperature=3.0)

DIGITS = dict(image_shape=(1, 16, 16), mean=DIGITS_MEAN, std=DIGITS_STD, setting_id=1,
              iterations=500, lr=0.1, r_feature=0.05, first_bn_multiplier=10.0, tv_l2=1e-4,
              tv_l1=0.0, l2=1e-5, jitter=2, jitter_mode="shift", flip=False)


def digits_settings() -> dict:
    """Inverter keyword arguments (plus "iterations") for the shipped digits teacher."""
    return dict(DIGITS)


def inversion_settings(teacher: str, arch: str | None = None) -> dict:
    """Inverter keyword arguments (plus "iterations") for the CLI's --teacher and --arch."""
    if teacher == "digits":
        return digits_settings()
    if arch is not None and arch.endswith("_cifar"):
        return dict(CIFAR10)
    return dict(IMAGENET)
