"""The random jitter (circular shift) and horizontal flip DeepInversion applies to the images at
every iteration, drawn from a private RNG so a seed reproduces the whole run."""
from __future__ import annotations

import random

import torch


class JitterFlip:
    """Draws one (dy, dx, flip) per iteration: shifts uniform in [−limit, limit], flip with
    probability ½ when enabled (same draw order as the reference code)."""

    def __init__(self, limit: int, flip: bool, seed: int | None):
        self.limit = int(limit)
        self.flip = flip
        self.rng = random.Random(seed)

    def draw(self):
        dy = self.rng.randint(-self.limit, self.limit)
        dx = self.rng.randint(-self.limit, self.limit)
        flip = self.rng.random() > 0.5
        return dy, dx, flip and self.flip


def jitter_flip(x: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        x = torch.flip(x, dims=(3,))
    return x
