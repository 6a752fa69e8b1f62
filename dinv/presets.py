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
DIGITS_FAST / CIFAR10_FAST: `dinv.FastInverter` keyword arguments (plus "iterations": generator
steps per batch) for the same teachers; see `fast_inversion_settings`.
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
# What `dinv demo` shows: images a person recognizes rather than images that teach best. A 100x
# stronger TV prior and no first-layer boost make smooth strokes (a 5-NN classifier on the real
# digits' pixels recognizes 67 % of them, against 43 % of DIGITS' images), but a student
# distilled from 1200 of them reaches only 77.8 % on the real test digits (DIGITS: 98.2 %).
DIGITS_PREVIEW = dict(DIGITS, tv_l2=1e-2, first_bn_multiplier=1.0)


# FastInverter: the pixel preset's loss (DIGITS) with a generator of ~20K parameters, 10 steps per
# batch after a 100-step warm-up. 1200 images take ~1/20 of the pixel preset's time (500
# iterations per batch) and teach a student as well (benchmarks/RESULTS.md, "Fast synthesis").
DIGITS_FAST = dict(image_shape=(1, 16, 16), mean=DIGITS_MEAN, std=DIGITS_STD, iterations=10,
                   warmup=100, lr=0.01, lr_z=0.1, meta_lr=0.5, latent_dim=32, width=8,
                   diversity=3.0, diversity_temperature=2.0, memory=1200, r_feature=0.05,
                   first_bn_multiplier=10.0, tv_l2=1e-4, tv_l1=0.0, l2=1e-5, jitter=2,
                   jitter_mode="shift", flip=False)

# FastInverter on CIFAR-10 in the style of Fast-Datafree's "Fast-10" runs (scripts/fast_cifar.sh:
# 10 generator steps per batch, generator lr 2e-3, latent lr 0.01, BN weight 10, CE weight 0.4,
# a 256-d latent and a 64-wide generator, random crops with 4 pixels of padding and flips; they
# synthesize batches of 256). Not measured here (no GPU). Fast-Datafree's BN-statistics momentum
# has no equivalent, and its 20 warm-up epochs (no student training, no adversarial term) become
# a 200-step first batch; its adversarial weight (1.1) is ADI's competition, for online runs
# (`dinv distill --mode adi --synthesizer fast`).
CIFAR10_FAST = dict(image_shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, iterations=10,
                    warmup=200, lr=2e-3, lr_z=0.01, meta_lr=0.5, latent_dim=256, width=64,
                    diversity=1.0, diversity_temperature=2.0, memory=4096, r_feature=10.0,
                    first_bn_multiplier=1.0, main_loss_multiplier=0.4, tv_l2=0.0, tv_l1=0.0,
                    l2=0.0, jitter=4, jitter_mode="shift", flip=True)

# FastInverter elsewhere (ImageNet-sized teachers): the CIFAR-10 run's generator and loss at the
# ImageNet preset's shape and BN weight. A starting point, not a measured recipe.
IMAGENET_FAST = dict(CIFAR10_FAST, image_shape=(3, 224, 224), mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, r_feature=0.01, first_bn_multiplier=10.0,
                     main_loss_multiplier=1.0, jitter=30)


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


def fast_inversion_settings(teacher: str, arch: str | None = None) -> dict:
    """FastInverter keyword arguments (plus "iterations") for the CLI's --teacher and --arch."""
    if teacher == "digits":
        return dict(DIGITS_FAST)
    if arch is not None and arch.endswith("_cifar"):
        return dict(CIFAR10_FAST)
    return dict(IMAGENET_FAST)
