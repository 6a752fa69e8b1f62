"""Augmentations: the random jitter and flip DeepInversion applies to the images at every
iteration, and the random translations a student trains with.

The inversion's jitter and flip are applied as index math: one gather along H and one along W with
index vectors built from the draw, instead of roll's slice-and-concatenate per dimension plus a
flip copy. The index vectors are tensors, so a compiled iteration takes them as inputs and does not
recompile for every new shift. Two jitter modes:
- "roll" (the reference's): a circular shift; what leaves one border enters at the other;
- "shift": a translation that fills the uncovered border with the background (pixel value 0),
  so strokes near a border are not wrapped around (digits, line drawings).
"""
from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

JITTER_MODES = ("roll", "shift")


class JitterFlip:
    """Draws one (dy, dx, flip) per iteration from a private RNG: shifts uniform in
    [−limit, limit], flip with probability ½ when enabled (the reference's draw order)."""

    def __init__(self, limit: int, flip: bool, seed: int | None):
        self.limit = int(limit)
        self.flip = flip
        self.rng = random.Random(seed)

    def draw(self):
        dy = self.rng.randint(-self.limit, self.limit)
        dx = self.rng.randint(-self.limit, self.limit)
        flip = self.rng.random() > 0.5
        return dy, dx, flip and self.flip


class View(NamedTuple):
    """Where each pixel of a jittered view comes from: out[..., i, j] = x[..., rows[i], cols[j]],
    except where `inside` is False (mode "shift": filled with the background)."""
    rows: torch.Tensor
    cols: torch.Tensor
    inside: torch.Tensor | None


def view_indices(height: int, width: int, dy: int, dx: int, flip: bool, mode: str = "roll",
                 device=None) -> View:
    """The view of `torch.flip(torch.roll(x, (dy, dx), (2, 3)), (3,))` (flip optional) for mode
    "roll"; for "shift", the same translation without wrap-around."""
    if mode not in JITTER_MODES:
        raise ValueError(f"jitter mode must be one of {JITTER_MODES}, got {mode!r}")
    rows = torch.arange(height, device=device) - dy
    cols = torch.arange(width, device=device)
    if flip:
        cols = cols.flip(0)
    cols = cols - dx
    if mode == "roll":
        return View(rows % height, cols % width, None)
    inside = ((rows >= 0) & (rows < height)).view(-1, 1) & ((cols >= 0) & (cols < width)).view(1, -1)
    return View(rows.clamp(0, height - 1), cols.clamp(0, width - 1), inside)


def apply_view(x: torch.Tensor, view: View, background: torch.Tensor | None = None):
    """The jittered view of images `x` [N, C, H, W]; `background` [1, C, 1, 1] fills the pixels
    outside the image in mode "shift"."""
    out = x.index_select(2, view.rows).index_select(3, view.cols)
    if view.inside is None:
        return out
    return torch.where(view.inside, out, background.to(out.dtype))


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator):
    """Shifts each image by its own integer offsets in [-max_shift, max_shift] (both axes),
    filling the uncovered border with the batch's darkest value, which is the background of
    digits and most line drawings (a circular shift would wrap strokes around to the other
    side). The offsets come from `generator` (a CPU generator)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=images.min().item())
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(images: torch.Tensor, generator: torch.Generator):
    """Mirrors each image horizontally with probability ½ (draws from `generator`, on the CPU)."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
