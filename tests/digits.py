"""Builders the tests of several modules share, on the shipped digits teacher."""
import torch

from dinv import Inverter, models
from dinv.presets import digits_settings


def make_inverter(teacher, **overrides) -> Inverter:
    """An Inverter of `teacher` with the digits preset, `overrides` applied."""
    settings = digits_settings()
    settings.pop("iterations")
    return Inverter(teacher, **{**settings, **overrides})


def make_student(seed: int = 0):
    torch.manual_seed(seed)
    return models.create("digits_student")


def noise(count: int, seed: int = 0) -> torch.Tensor:
    """Standard normal images: where inversion starts, and the paper's baseline."""
    return torch.randn((count, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
