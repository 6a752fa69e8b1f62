"""Inversion settings that work for the models dinv knows.

DIGITS: measured on the shipped digits teacher (16×16 grayscale). Flips are off on purpose: they
are a prior about the domain, and mirrored digits are other shapes (shared DESIGN notes: a
student distilled from flipped digits lost 7–25 points). Jitter is a pixel, the images are tiny.
IMAGENET: the reference script's defaults (ResNet-50, 224 px, setting 0).
"""
from __future__ import annotations

from .imaging import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = dict(image_shape=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, setting_id=0,
                iterations=None, lr=0.25, r_feature=0.01, first_bn_multiplier=10.0, tv_l2=1e-4,
                tv_l1=0.0, l2=1e-5, jitter=30, flip=True)


def digits_settings() -> dict:
    from .models.digits import DIGITS_MEAN, DIGITS_STD

    return dict(image_shape=(1, 16, 16), mean=DIGITS_MEAN, std=DIGITS_STD, setting_id=1,
                iterations=200, lr=0.1, r_feature=0.05, first_bn_multiplier=10.0, tv_l2=1e-3,
                tv_l1=0.0, l2=1e-4, jitter=1, flip=False)


def inversion_settings(teacher: str) -> dict:
    """Inverter keyword arguments (plus "iterations") for a teacher name of the CLI."""
    return digits_settings() if teacher == "digits" else dict(IMAGENET)
