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
        self._installed: list = []
        self._stats: list = [None] * len(self.layers)
        self._running = None
        self._segment = None

    def _read_running_statistics(self) -> None:
        """Concatenates every layer's running mean and var as they are now: read at every
        installation (each `invert`), as the reference reads them at every forward, so a
        `load_state_dict` after the Inverter was built is honoured."""
        means = [m.running_mean.detach().flatten() for m in self.layers]
        variances = [m.running_var.detach().flatten() for m in self.layers]
        acc = torch.float64 if means[0].dtype == torch.float64 else torch.float32
        self._running = torch.cat(means + variances).to(acc)
        if self._segment is None or self._segment.numel() != self._running.numel():
            sizes = torch.tensor([m.numel() for m in means])
            segment = torch.repeat_interleave(torch.arange(len(means)), sizes)
            # Segment id per element of cat([means, vars]): means -> 0..L-1, vars -> L..2L-1.
            self._segment = torch.cat([segment, segment + len(means)])
        self._segment = self._segment.to(self._running.device)

    # -- installation ------------------------------------------------------------------------
    def __enter__(self):
        """Installs the statistics collection on every BatchNorm layer. Re-entrant: a nested
        installation (another BNStatistics of the same model, or this one again) takes over
        until it exits, then the previous one is back exactly."""
        self._read_running_statistics()
        installed = []
        for index, layer in enumerate(self.layers):
            if self.fused:
                # The instance attribute shadows the class's forward; remember what it shadowed
                # (nothing, or an outer installation's forward) to put it back.
                previous = layer.__dict__.get("forward")
                layer.forward = self._fused_forward(index, layer)
                installed.append((layer, previous))
            else:
                installed.append(layer.register_forward_hook(self._hook(index)))
        self._installed.append(installed)
        return self

    def __exit__(self, *exc):
        if self._installed:
            self._uninstall(self._installed.pop())
        self._stats = [None] * len(self.layers)

    def remove(self) -> None:
        """Removes every installation of this object (a safety net for interrupted runs)."""
        while self._installed:
            self._uninstall(self._installed.pop())
        self._stats = [None] * len(self.layers)

    @staticmethod
    def _uninstall(installed) -> None:
        for entry in reversed(installed):
            if isinstance(entry, tuple):
                layer, previous = entry
                if previous is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous
            else:
                entry.remove()

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
    def layer_losses(self, merge=None) -> torch.Tensor:
        """[L] fp32 (fp64 for a fp64 teacher): ‖rv_l − var_l‖₂ + ‖rm_l − mean_l‖₂ for each layer
        of the last forward. `merge` (a global batch's `GlobalBatch.merge`) turns this process's
        statistics, every layer's means then variances in one vector, into the whole batch's."""
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(f"BatchNorm layers {missing} did not run in the last forward "
                               "(are they used by the model's forward?)")
        acc = self._running.dtype
        means = [s[0].to(acc) for s in self._stats]
        variances = [s[1].to(acc) for s in self._stats]
        statistics = torch.cat(means + variances)
        if merge is not None:
            statistics = merge(statistics)
        diff = self._running - statistics
        count = len(self.layers)
        squares = diff.new_zeros(2 * count).index_add_(0, self._segment, diff * diff)
        norms = torch.sqrt(squares.clamp_min(NORM_EPS * NORM_EPS))
        self._stats = [None] * count
        return norms[:count] + norms[count:]
