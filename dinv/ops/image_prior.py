"""Image priors of the DeepInversion reference, from one fused pass over the images:

- total variation over four neighbour differences (horizontal, vertical, two diagonals), as the
  sum of their Frobenius norms (`tv_l2`) or of their mean absolute values (`tv_l1`);
- the L2 prior, the mean over images of each image's norm (`l2`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import _backends
from .bn_stat import NORM_EPS

KINDS = ("l1", "l2")


class ImagePrior(NamedTuple):
    tv_l1: torch.Tensor  # Σ_k mean|d_k|
    tv_l2: torch.Tensor  # Σ_k ‖d_k‖_F
    l2: torch.Tensor     # mean_n ‖x_n‖


def tv_differences(x: torch.Tensor):
    return (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
            x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])


def difference_counts(x: torch.Tensor):
    n, c, h, w = x.shape
    return (n * c * h * (w - 1), n * c * (h - 1) * w, n * c * (h - 1) * (w - 1),
            n * c * (h - 1) * (w - 1))


@functools.lru_cache(maxsize=64)
def _difference_weights(counts, dtype, device):
    """([4] count_k, or 1 for an empty difference; [4] 1 where difference k has elements, else
    0) on `device`. Cached per shape: a host-to-device copy on every call would make every
    iteration wait for the GPU, and cannot be captured in a CUDA graph. (Under torch.compile they
    are built uncached and become graph constants.)"""
    divisors = torch.tensor([max(count, 1) for count in counts], dtype=dtype, device=device)
    present = torch.tensor([float(count > 0) for count in counts], dtype=dtype, device=device)
    return divisors, present


def _safe_sqrt(sum_of_squares: torch.Tensor) -> torch.Tensor:
    # The gradient is 0 below NORM_EPS instead of sqrt's infinite slope at 0.
    return torch.sqrt(sum_of_squares.clamp_min(NORM_EPS * NORM_EPS))


def _check(x):
    if x.dim() != 4:
        raise ValueError(f"image priors expect images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")


def image_prior_reference(x: torch.Tensor) -> ImagePrior:
    """The reference formulas in the acc dtype; an empty difference (H or W = 1) counts 0."""
    _check(x)
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    zero = (xf * 0).sum()  # connected to x, so an all-empty TV still has a (zero) gradient
    tv_l1, tv_l2 = zero, zero
    for d in tv_differences(xf):
        if d.numel() == 0:
            continue
        tv_l1 = tv_l1 + d.abs().mean()
        tv_l2 = tv_l2 + _safe_sqrt((d * d).sum())
    l2 = _safe_sqrt((xf * xf).flatten(1).sum(1)).mean() if x.shape[0] else zero
    return ImagePrior(tv_l1, tv_l2, l2)


def image_prior_sums_reference(x: torch.Tensor):
    """The torch formulation of `image_prior_sums`."""
    _check(x)
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    differences = tv_differences(xf)
    tv = torch.stack([torch.stack([d.abs().sum() for d in differences]),
                      torch.stack([(d * d).sum() for d in differences])])
    return tv, (xf * xf).flatten(1).sum(1)


def image_prior_sums(x: torch.Tensor):
    """([2, 4]: Σ|d_k| and Σd_k² of the four neighbour differences, [N]: Σx² of each image), fp32
    (fp64 for fp64 input), from one pass over `x`: the priors before their divisions and square
    roots, so that a batch spread over processes can add its parts' sums first
    (`prior_from_sums` finishes them)."""
    _check(x)
    backend = _backends.select("image_prior_sums", x)
    if backend == "reference":
        return image_prior_sums_reference(x)
    return _backends.primitives(backend).image_prior_sums(x)


def prior_from_sums(tv: torch.Tensor, norm_sum: torch.Tensor, counts, num_images: int):
    """The ImagePrior of a batch from its `image_prior_sums` `tv`, the sum over its images of
    their norms (Σ_n sqrt(Σx²)), its `difference_counts` and its number of images."""
    make = _difference_weights.__wrapped__ if torch.compiler.is_compiling() else \
        _difference_weights
    divisors, present = make(tuple(counts), tv.dtype, tv.device)
    return ImagePrior(tv_l1=(tv[0] / divisors).sum(), tv_l2=(_safe_sqrt(tv[1]) * present).sum(),
                      l2=norm_sum / max(num_images, 1))


def image_norms(squares: torch.Tensor) -> torch.Tensor:
    """Each image's norm from its Σx², with the gradient 0 (not NaN) at an all-zero image."""
    return _safe_sqrt(squares)


def image_prior(x: torch.Tensor) -> ImagePrior:
    """(tv_l1, tv_l2, l2) of images `x` [N, C, H, W], forward and backward each in one pass over
    `x` on the native backends, whichever of the three the caller uses."""
    _check(x)
    backend = _backends.select("image_prior_sums", x)
    if backend == "reference":
        return image_prior_reference(x)
    tv, squares = _backends.primitives(backend).image_prior_sums(x)
    return prior_from_sums(tv, image_norms(squares).sum(), difference_counts(x), x.shape[0])


def _tv_kind(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return KINDS.index(kind)


def tv_loss_reference(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    index = _tv_kind(kind)
    return image_prior_reference(x)[index]


def tv_loss(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Σ_k ‖d_k‖_F (kind="l2") or Σ_k mean|d_k| (kind="l1") of images `x` [N, C, H, W]."""
    index = _tv_kind(kind)
    return image_prior(x)[index]
