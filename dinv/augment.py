"""The random jitter (circular shift) and horizontal flip DeepInversion applies to the images at
every iteration, drawn from a private RNG so a seed reproduces the whole run.

The shift and flip are applied as index math: one gather along H and one along W with index
vectors built from the draw, instead of roll's slice-and-concatenate per dimension plus a flip
copy. The index vectors are tensors, so a compiled iteration takes them as inputs and does not
recompile for every new shift."""
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


def jitter_flip_indices(height: int, width: int, dy: int, dx: int, flip: bool, device=None):
    """Source rows and columns of `torch.flip(torch.roll(x, (dy, dx), (2, 3)), (3,))` (flip
    optional): out[..., i, j] = x[..., rows[i], cols[j]]."""
    rows = (torch.arange(height, device=device) - dy) % height
    cols = torch.arange(width, device=device)
    if flip:
        cols = cols.flip(0)
    return rows, (cols - dx) % width


def gather_hw(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return x.index_select(2, rows).index_select(3, cols)
