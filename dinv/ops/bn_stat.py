"""BatchNorm-statistic loss: how far a batch's per-channel mean/variance are from a BN layer's
running statistics (DeepInversion's feature-distribution regularizer), and the fused eval-mode
BatchNorm that produces those statistics from the same read of its input."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends
from ._native import acc_dtype

# Norms are sqrt(max(Σd², NORM_EPS²)): the value is exact to within NORM_EPS, and the gradient is
# d/‖d‖ above it and 0 (not NaN, as sqrt's derivative at 0 would give) below it.
NORM_EPS = 1e-12


def safe_norm(d: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((d * d).sum().clamp_min(NORM_EPS * NORM_EPS))


def _check_stat_input(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"expected a batch with a channel dimension [N, C, ...], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")


def channel_stats_reference(x: torch.Tensor):
    """Per-channel mean and biased variance over every dim but 1, computed in the acc dtype."""
    xf = x.to(acc_dtype(x.dtype))
    dims = [0] + list(range(2, x.dim()))
    return xf.mean(dims), xf.var(dims, correction=0)


def stat_divergence(mean, var, running_mean, running_var) -> torch.Tensor:
    """‖running_var − var‖₂ + ‖running_mean − mean‖₂ on per-channel vectors (running stats are
    constants: they get no gradient)."""
    running_mean = running_mean.detach().to(mean.dtype)
    running_var = running_var.detach().to(var.dtype)
    return safe_norm(running_var - var) + safe_norm(running_mean - mean)


def channel_stats(x: torch.Tensor):
    """(mean, biased var) per channel of `x` [N, C, ...], fp32 (fp64 for fp64 input), one pass."""
    _check_stat_input(x)
    backend = _backends.select("channel_stats", x)
    if backend == "reference":
        return channel_stats_reference(x)
    return _backends.primitives(backend).channel_stats(x)


def bn_stat_loss_reference(x, running_mean, running_var) -> torch.Tensor:
    mean, var = channel_stats_reference(x)
    return stat_divergence(mean, var, running_mean, running_var)


def _check_running(x, running_mean, running_var):
    c = x.shape[1]
    if running_mean.shape != (c,) or running_var.shape != (c,):
        raise ValueError(f"running statistics must have shape ({c},) to match x {tuple(x.shape)}, "
                         f"got {tuple(running_mean.shape)} and {tuple(running_var.shape)}")


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor):
    """‖running_var − var(x)‖₂ + ‖running_mean − mean(x)‖₂ (biased var over N and spatial dims)."""
    _check_stat_input(x)
    _check_running(x, running_mean, running_var)
    mean, var = channel_stats(x)
    return stat_divergence(mean, var, running_mean, running_var)


def bn_inversion_reference(x, weight, bias, running_mean, running_var, eps):
    """Eval BatchNorm and the batch statistics, in the acc dtype (as the kernels compute them)."""
    acc = acc_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    y = F.batch_norm(x.to(acc), cast(running_mean), cast(running_var), cast(weight), cast(bias),
                     False, 0.0, eps).to(x.dtype)
    return (y,) + tuple(channel_stats_reference(x))


def bn_inversion(x, weight, bias, running_mean, running_var, eps: float):
    """Eval-mode BatchNorm `y` plus the batch's (mean, var) of its input, from one read of `x`.

    Gradients flow to `x` only, from `y` and from the statistics; the BN's parameters and running
    statistics are treated as the frozen teacher's constants."""
    _check_stat_input(x)
    _check_running(x, running_mean, running_var)
    backend = _backends.select("bn_stats_forward", x)
    if backend == "reference":
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return bn_inversion_reference(x, detach(weight), detach(bias), running_mean.detach(),
                                      running_var.detach(), eps)
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    return _backends.primitives(backend).bn_stats_forward(
        x, weight, bias, running_mean.detach(), running_var.detach(), float(eps))
