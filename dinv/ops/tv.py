"""Total-variation image prior of the DeepInversion reference: four neighbour differences
(horizontal, vertical, two diagonals), as the sum of their Frobenius norms (l2) or of their
mean absolute values (l1)."""
from __future__ import annotations

import torch

from . import _backends
from .bn_stat import NORM_EPS

KINDS = ("l1", "l2")


def tv_differences(x: torch.Tensor):
    return (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
            x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])


def difference_counts(x: torch.Tensor):
    n, c, h, w = x.shape
    return (n * c * h * (w - 1), n * c * (h - 1) * w, n * c * (h - 1) * (w - 1),
            n * c * (h - 1) * (w - 1))


def tv_loss_reference(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """The reference formula in the acc dtype; an empty difference (H or W = 1) counts 0."""
    _check(x, kind)
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    total = (xf * 0).sum()  # connected to x, so an all-empty TV still has a (zero) gradient
    for d in tv_differences(xf):
        if d.numel() == 0:
            continue
        total = total + (torch.sqrt((d * d).sum().clamp_min(NORM_EPS * NORM_EPS)) if kind == "l2"
                         else d.abs().mean())
    return total


def _check(x, kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"tv_loss expects images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")


def tv_loss(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Σ_k ‖d_k‖_F (kind="l2") or Σ_k mean|d_k| (kind="l1") of images `x` [N, C, H, W]."""
    _check(x, kind)
    backend = _backends.select(x)
    if backend == "reference":
        return tv_loss_reference(x, kind)
    power = 2 if kind == "l2" else 1
    sums = _backends.primitives(backend).tv_sums(x, power)
    counts = difference_counts(x)
    present = [k for k, count in enumerate(counts) if count > 0]  # H or W == 1 empties some
    if kind == "l2":
        return torch.sqrt(sums[present].clamp_min(NORM_EPS * NORM_EPS)).sum()
    divisors = torch.tensor([counts[k] for k in present], dtype=sums.dtype, device=sums.device)
    return (sums[present] / divisors).sum()
