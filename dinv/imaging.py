"""Moving images between the teacher's normalized input space and viewable pixels."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def pixel_bounds(mean, std, device=None):
    """Per-channel [lo, hi] of normalized values whose pixels lie in [0, 1], shaped [1, C, 1, 1]."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalized images [N, C, H, W] -> pixels in [0, 1] (a new fp32 tensor)."""
    images = images.detach().float()
    return (images * _per_channel(std, images) + _per_channel(mean, images)).clamp_(0, 1)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] pixels in [0, 1] -> uint8 array [N, H, W, C]."""
    return (pixels.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    """Normalized images -> PIL images (grayscale for one channel)."""
    arrays = to_uint8(denormalize(images, mean, std))
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def grid(pixels: torch.Tensor, nrow: int = 10, padding: int = 2, upscale: int = 1) -> Image.Image:
    """A grid of [N, C, H, W] pixels in [0, 1] as one PIL image, `nrow` per row."""
    arrays = to_uint8(pixels)
    n, h, w, c = arrays.shape
    if upscale > 1:
        arrays = arrays.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    canvas = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c),
                      dtype=np.uint8)
    for i, a in enumerate(arrays):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y:y + h, x:x + w] = a
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_grid(images: torch.Tensor, path, mean=IMAGENET_MEAN, std=IMAGENET_STD, nrow: int = 10,
              upscale: int = 1) -> None:
    """Saves normalized images as a PNG grid (written to a temporary name, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    grid(denormalize(images, mean, std), nrow=nrow, upscale=upscale).save(tmp)
    os.replace(tmp, path)
