"""Per-BatchNorm batch statistics of a frozen teacher, and the feature-distribution loss on them.

Two ways to get the statistics, same numbers:
- hook mode: a forward hook on each BN reads its input with the fused one-pass `channel_stats`
  (no permute/contiguous copy, unlike the reference's hook);
- fused mode: the BN's forward is swapped for `ops.bn_inversion`, which normalizes and
  accumulates the statistics from one read of the input, and whose backward folds the
  statistic-loss gradient into BN's input gradient (one pass instead of three).
Either way the per-layer tails ‖rv − var‖ + ‖rm − mean‖ are computed for all layers at once on
concatenated vectors (a fixed handful of small ops instead of ~6 per layer).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .ops.bn_stat import NORM_EPS


def stat_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm) whose running statistics can be matched."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


class BNStatistics:
    """Collects (mean, var) of every BN input during the forwards run inside `with stats:`."""

    def __init__(self, model: nn.Module, fused: bool):
        self.layers = stat_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics: "
                "DeepInversion matches feature statistics to BatchNorm running mean/var, so the "
                "teacher must contain BatchNorm1d/2d/3d or SyncBatchNorm layers in eval mode")
        self.fused = fused
        self._handles: list = []
        self._stats: list = [None] * len(self.layers)
        rm = torch.cat([m.running_mean.detach().float().flatten() for m in self.layers])
        rv = torch.cat([m.running_var.detach().float().flatten() for m in self.layers])
        sizes = [m.running_mean.numel() for m in self.layers]
        self._running = torch.cat([rm, rv])
        segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # Segment id per element of cat([mean_all, var_all]): means -> 0..L-1, vars -> L..2L-1.
        self._segment = torch.cat([segment, segment + len(sizes)]).to(rm.device)

    # -- installation ------------------------------------------------------------------------
    def __enter__(self):
        for index, layer in enumerate(self.layers):
            if self.fused:
                layer.forward = self._fused_forward(index, layer)
                self._handles.append(layer)
            else:
                self._handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            if isinstance(handle, nn.Module):
                del handle.forward  # the instance attribute; the class's forward shows again
            else:
                handle.remove()
        self._handles.clear()
        self._stats = [None] * len(self.layers)

    def _hook(self, index):
        def hook(module, inputs, output):
            self._stats[index] = ops.channel_stats(inputs[0])
        return hook

    def _fused_forward(self, index, layer):
        def forward(x):
            y, mean, var = ops.bn_inversion(x, layer.weight, layer.bias, layer.running_mean,
                                            layer.running_var, layer.eps)
            self._stats[index] = (mean, var)
            return y
        return forward

    # -- the loss ------------------------------------------------------------------------------
    def layer_losses(self) -> torch.Tensor:
        """[L] fp32: ‖rv_l − var_l‖₂ + ‖rm_l − mean_l‖₂ for each layer of the last forward."""
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(f"BatchNorm layers {missing} did not run in the last forward "
                               "(are they used by the model's forward?)")
        means = [s[0].float() for s in self._stats]
        variances = [s[1].float() for s in self._stats]
        device = means[0].device
        if self._running.device != device:
            self._running = self._running.to(device)
            self._segment = self._segment.to(device)
        diff = self._running - torch.cat(means + variances)
        count = len(self.layers)
        squares = torch.zeros(2 * count, device=device).index_add_(0, self._segment, diff * diff)
        norms = torch.sqrt(squares.clamp_min(NORM_EPS * NORM_EPS))
        self._stats = [None] * count
        return norms[:count] + norms[count:]
