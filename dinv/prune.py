"""Data-free structured pruning (Yin et al., CVPR 2020, §4.3): whole channels of a trained network
are removed by ranking them on images synthesized from the network itself (DeepInversion),
never on its training data; the pruned copy is then fine-tuned by distillation from the unpruned
network on the same images (`dinv.distill.distill_offline`).

    from dinv.data import load_shards
    from dinv.distill import distill_offline
    from dinv.prune import prune, save_pruned, load_pruned

    images, labels = load_shards("synth/")                 # `dinv invert` / synthesize_dataset
    result = prune(teacher, images, targets=labels, macs_ratio=0.5)   # keep 50 % of the MACs
    distill_offline(teacher, result.model, (images, labels), epochs=30)
    save_pruned(result.model, "pruned.pt", arch="digits_net")
    model = load_pruned("pruned.pt")                       # no unpickling of code

Criteria (`importance=`), each a Torch-Pruning `Importance` (a callable: dependency group ->
one score per channel; higher is kept):
    "taylor"     Molchanov et al. 2019, the criterion DeepInversion's authors used: a channel's
                 score is the squared first-order Taylor term of a gate g after its BatchNorm,
                 (∂L/∂g)² = (γ·∂L/∂γ + β·∂L/∂β)², per minibatch of synthesized images, averaged
                 over the minibatches and summed over the BatchNorms of a dependency group
                 (residual connections couple several). L = T²·KL(teacher ‖ pruned) at
                 temperature T + CE(pruned(x), y_synth): no real image, no real label. At the
                 first step the pruned copy is the teacher and the KL gradient is exactly 0, so
                 the synthesis targets carry the signal. Groups without a BatchNorm use the gate
                 on the output of their convolutions / linear layers instead.
    "magnitude"  Torch-Pruning's group L2 norm of the channel's weights (every coupled layer),
                 without its per-group normalization, which would make a global ranking rank
                 every group's channels alike.
    "random"     uniform scores from a seeded generator: the baseline.
Scores are ranked globally, across layers. Hardware-aware pruning (§4.3, as HALP, Shen et al.
2022) ranks by Î − η·ΔL̂: the importance over its mean, minus η times the latency that removing
one channel of the group saves, over its mean, read from a `LatencyTable` measured on the
device (η = 1 values an average channel's saving like an average channel's importance).

How channels are removed: Torch-Pruning's `DependencyGraph` gives the groups of layers one
channel removal touches (conv out -> BatchNorm -> next conv in, residual adds); its
`BasePruner` schedules channel fractions, so dinv chooses the channels itself: `steps` times, it
scores every channel of every group on the current network, then removes the lowest-scored ones
one at a time, each time updating the exact MACs / parameters / table latency the removal saves
(the cost models below), until the step's target is reached; the targets fall linearly from the
full cost to `ratio` × cost. Every group keeps at least one channel; the classifier's outputs
(the last convolution or linear layer the forward runs) are never pruned, nor `ignored_layers`.

MACs are per image, convolutions and linear layers (as the papers count them); parameters are
every parameter; latency is measured end to end on `example_inputs` (median of repeated runs),
and the `latency_ratio` target is on the table's latency (the sum of its layers').

Torch-Pruning is the `prune` extra (`pip install "dinv[prune]"`), imported on first use.
Grouped convolutions other than depthwise ones are not supported (their channels go in blocks).
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .data import load_shards
from .files import DamagedFile, atomic_json, atomic_save, load_tensors
from .model_utils import frozen, model_device, model_dtype

INSTALL_HINT = 'pip install "dinv[prune]"'
CRITERIA = ("taylor", "magnitude", "random")
TARGETS = ("macs", "params", "latency", "channels")   # what a `<target>_ratio` keeps
TABLE_FORMAT = "dinv-latency-table/1"
PRUNED_FORMAT = "dinv-pruned-model/1"
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def torch_pruning():
    """The torch_pruning module, imported on first use; an ImportError naming the extra without
    it. dinv's criteria are registered as its `Importance` subclasses (an abstract base class)."""
    try:
        import torch_pruning as tp
    except ImportError as error:
        raise ImportError(f"dinv.prune needs Torch-Pruning: {INSTALL_HINT} "
                          f"(or pip install 'torch-pruning>=1.6,<1.7')") from error
    for criterion in (TaylorImportance, MagnitudeImportance, RandomImportance):
        tp.importance.Importance.register(criterion)
    return tp


# =============================================================================================
# The layers whose cost changes with the channels, and the cost models of the targets.
# =============================================================================================
@dataclass(frozen=True)
class LayerKey:
    """What a layer's latency depends on, as HALP keys its table: the layer's kind, the batch,
    its full channel counts, the input feature map (conv: spatial size; linear: the dimensions
    between batch and features), kernel, stride, padding, dilation, groups and bias."""
    kind: str
    batch: int
    in_channels: int
    out_channels: int
    feature_map: tuple
    kernel: tuple = ()
    stride: tuple = ()
    padding: object = ()
    dilation: tuple = ()
    groups: int = 1
    bias: bool = False

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "LayerKey":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(eq=False)
class _Layer:
    """A convolution, linear layer or per-channel parametrized layer (BatchNorm, ...) of the
    network being pruned, with what its MACs and parameter count depend on, and its channel
    counts as the selection simulates them (`c_in`, `c_out`; reset from the module by `sync`)."""
    name: str
    module: nn.Module
    kind: str                   # "conv", "linear" or "norm"
    positions: int = 1          # output positions per image (conv: spatial; linear: tokens)
    kernel: int = 1
    groups: int = 1
    bias: bool = False
    params_per_channel: int = 0  # "norm": parameters per channel
    key: LayerKey | None = None
    c_in: float = 0
    c_out: float = 0

    @property
    def depthwise(self) -> bool:
        return self.key is not None and self.key.depthwise

    def channels(self) -> tuple:
        m = self.module
        if self.kind == "conv":
            return m.in_channels, m.out_channels
        if self.kind == "linear":
            return m.in_features, m.out_features
        channels = next(m.parameters(recurse=False)).shape[0]
        return channels, channels

    def sync(self) -> None:
        self.c_in, self.c_out = self.channels()

    def _inputs_per_output(self, c_in) -> float:
        return 1 if self.depthwise else c_in / self.groups

    def macs(self, c_in, c_out) -> float:
        if self.kind == "norm":
            return 0.0
        return self.positions * self.kernel * self._inputs_per_output(c_in) * c_out

    def params(self, c_in, c_out) -> float:
        if self.kind == "norm":
            return self.params_per_channel * c_out
        return self.kernel * self._inputs_per_output(c_in) * c_out + (c_out if self.bias else 0)


def _trace_layers(model: nn.Module, example_inputs: torch.Tensor) -> dict:
    """{module: _Layer} of every convolution, linear layer and per-channel parametrized module
    the forward of `example_inputs` runs, in execution order (one forward, eval mode, no grad)."""
    layers, hooks = {}, []
    batch = example_inputs.shape[0]

    def record(module, inputs, output):
        if not isinstance(output, torch.Tensor):  # a layer kind dinv does not model (LSTM, ...)
            return
        is_conv = isinstance(module, nn.modules.conv._ConvNd)
        positions = math.prod(output.shape[2:] if is_conv else output.shape[1:-1])
        if module in layers:  # run more than once (shared weights): its MACs add up
            layers[module].positions += positions
            return
        name = names[module]
        x = inputs[0]
        if is_conv:
            if module.groups > 1 and not (module.groups == module.in_channels
                                          == module.out_channels):
                raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) are not "
                                 "supported, only depthwise ones")
            key = LayerKey("conv", batch, module.in_channels, module.out_channels,
                           tuple(x.shape[2:]), tuple(module.kernel_size), tuple(module.stride),
                           module.padding if isinstance(module.padding, str)
                           else tuple(module.padding), tuple(module.dilation), module.groups,
                           module.bias is not None)
            layers[module] = _Layer(name, module, "conv", positions,
                                    math.prod(module.kernel_size), module.groups,
                                    module.bias is not None, key=key)
        elif isinstance(module, nn.Linear):
            key = LayerKey("linear", batch, module.in_features, module.out_features,
                           tuple(x.shape[1:-1]), bias=module.bias is not None)
            layers[module] = _Layer(name, module, "linear", positions,
                                    bias=module.bias is not None, key=key)
        else:
            own = list(module.parameters(recurse=False))
            channels = own[0].shape[0] if own[0].dim() == 1 else None
            if all(p.dim() == 1 and p.shape[0] == channels for p in own):
                layers[module] = _Layer(name, module, "norm",
                                        params_per_channel=sum(p.numel() for p in own) // channels)

    names = {}
    for name, module in model.named_modules():
        names[module] = name
        if isinstance(module, PRUNABLE) or any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad(), frozen(model):
            model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers.values():
        layer.sync()
    return layers


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates per image of the convolutions and linear layers in one forward of
    `example_inputs` (the convention of the pruning papers; biases, norms and activations are not
    counted)."""
    layers = _trace_layers(model, example_inputs)
    return int(round(sum(layer.macs(layer.c_in, layer.c_out) for layer in layers.values())))


def count_params(model: nn.Module) -> int:
    """Every parameter's elements."""
    return sum(p.numel() for p in model.parameters())


class _Cost:
    """What a target measures, as a sum over layers of `layer_cost(layer, c_in, c_out)`, plus
    `per_channel` for every prunable channel, plus `constant` (what pruning leaves alone: the
    parameters of layers that are not modelled)."""

    def __init__(self, name: str, table=None):
        self.name, self.table = name, table
        self.per_channel = 1.0 if name == "channels" else 0.0
        self.constant = 0.0

    def layer_cost(self, layer: _Layer, c_in, c_out) -> float:
        if self.name == "macs":
            return layer.macs(c_in, c_out)
        if self.name == "params":
            return layer.params(c_in, c_out)
        if self.name == "latency" and layer.key is not None:
            return self.table.latency(layer.key, c_in, c_out)
        return 0.0


# =============================================================================================
# Dependency groups and the channel selection.
# =============================================================================================
@dataclass(eq=False)
class _Group:
    """One Torch-Pruning dependency group (a set of channels removed together from every layer
    it couples) and how much one channel's removal shrinks each tracked layer."""
    group: object
    size: int
    shrink: dict = field(default_factory=dict)   # _Layer -> (inputs, outputs) per channel

    def root(self):
        return self.group[0].dep.target.module, self.group[0].dep.handler

    def saving(self, cost: _Cost) -> float:
        """What removing one more channel saves, at the layers' simulated channel counts."""
        saved = cost.per_channel
        for layer, (d_in, d_out) in self.shrink.items():
            saved += cost.layer_cost(layer, layer.c_in, layer.c_out) - \
                cost.layer_cost(layer, layer.c_in - d_in, layer.c_out - d_out)
        return saved

    def remove_one(self) -> None:
        for layer, (d_in, d_out) in self.shrink.items():
            layer.c_in -= d_in
            layer.c_out -= d_out


def _out_handlers() -> tuple:
    """Torch-Pruning's functions that remove a convolution's / linear layer's outputs."""
    tp = torch_pruning()
    return (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels,
            tp.prune_linear_out_channels)


def _direction(layer: _Layer, handler) -> str:
    if layer.kind == "norm" or layer.depthwise:
        return "both"
    return "out" if handler in _out_handlers() else "in"


def _dependency_groups(graph, layers: dict, ignored: list) -> list:
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE):
        entry = _Group(group, len(group[0].idxs))
        seen = set()
        for item in group:
            layer = layers.get(item.dep.target.module)
            direction = None if layer is None else _direction(layer, item.dep.handler)
            if layer is None or (layer, direction) in seen:
                continue
            seen.add((layer, direction))
            per_channel = len(item.idxs) / entry.size
            d_in, d_out = entry.shrink.get(layer, (0, 0))
            if direction == "both":
                d_in, d_out = per_channel, per_channel
            elif direction == "in":
                d_in += per_channel
            else:
                d_out += per_channel
            entry.shrink[layer] = (d_in, d_out)
        groups.append(entry)
    return groups


def _total_cost(layers: dict, groups: list, cost: _Cost) -> float:
    return sum(cost.layer_cost(layer, layer.c_in, layer.c_out) for layer in layers.values()) + \
        cost.per_channel * sum(g.size for g in groups) + cost.constant


def _select(groups: list, scores: list, cost: _Cost, current: float, target: float) -> dict:
    """{group: channel indices}: the lowest-scored channels, one at a time, each counted at what
    it saves once the previous ones are gone, until the cost is at most `target`; every group
    keeps one channel. Leaves the layers' simulated channel counts at the result."""
    owners = [(g, i) for g in groups for i in range(g.size)]
    order = torch.argsort(torch.cat(scores), stable=True).tolist()
    left = {g: g.size for g in groups}
    chosen = {g: [] for g in groups}
    for flat in order:
        if current <= target:
            break
        group, index = owners[flat]
        if left[group] <= 1:
            continue
        current -= group.saving(cost)
        group.remove_one()
        left[group] -= 1
        chosen[group].append(index)
    return {g: sorted(idxs) for g, idxs in chosen.items() if idxs}


# =============================================================================================
# Criteria.
# =============================================================================================
def _is_gate(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine


def _gate_modules(group) -> list:
    """The modules whose output channels gate the group's: its affine BatchNorms, or, without
    one, the convolutions / linear layers pruned at their outputs."""
    modules = list(dict.fromkeys(item.dep.target.module for item in group))
    gates = [m for m in modules if _is_gate(m)]
    if gates:
        return gates
    outputs = _out_handlers()
    return [item.dep.target.module for item in group
            if isinstance(item.dep.target.module, PRUNABLE) and item.dep.handler in outputs]


def _channel_sum(parameter: torch.Tensor, gradient: torch.Tensor, dim: int) -> torch.Tensor:
    product = (parameter.detach() * gradient).transpose(0, dim)
    return product.reshape(product.shape[0], -1).sum(1)


class TaylorImportance:
    """Molchanov et al.'s Taylor criterion on synthesized images (see the module doc).

    teacher: the unpruned network (frozen while it is used; left exactly as it was).
    images: normalized images [N, ...]; targets: their synthesis labels (None: the teacher's
    predictions). temperature: the KL term's T (the loss is T²·KL + CE). batch_size: images per
    minibatch; the score is the mean over minibatches of the squared gate gradient.
    `refresh(model, groups)` computes the scores of a network's gates; `__call__(group)` sums
    them over the group's gates, per channel.
    """

    def __init__(self, teacher: nn.Module, images: torch.Tensor, targets=None,
                 temperature: float = 4.0, batch_size: int = 64):
        self.teacher, self.images = teacher, images
        self.temperature, self.batch_size = float(temperature), int(batch_size)
        with torch.no_grad(), frozen(teacher):
            self.teacher_logits = torch.cat([teacher(x) for x in images.split(self.batch_size)])
        self.targets = self.teacher_logits.argmax(1) if targets is None else \
            torch.as_tensor(targets, device=images.device).long()
        self.scores: dict = {}

    def gate_scores(self, model: nn.Module, modules) -> dict:
        """{module: per-channel mean over minibatches of (Σ_p p·∂L/∂p)²}, p the module's weight
        and bias: for a BatchNorm, (γ·∂L/∂γ + β·∂L/∂β)², the gradient of a unit gate after it;
        for a convolution / linear layer, the same for a gate on its outputs. `model` runs in
        eval mode (running statistics untouched); its flags are restored."""
        modules = list(dict.fromkeys(modules))
        params = [[(p, 1 if getattr(m, "transposed", False) and p.dim() > 1 else 0)
                   for p in (m.weight, m.bias) if p is not None] for m in modules]
        flat = [p for entries in params for p, _ in entries]
        sums = [torch.zeros(m.weight.shape[1 if getattr(m, "transposed", False) else 0],
                            dtype=torch.float64, device=m.weight.device) for m in modules]
        batches = 0
        with frozen(model):
            for p in flat:
                p.requires_grad_(True)
            for start in range(0, len(self.images), self.batch_size):
                stop = start + self.batch_size
                logits = model(self.images[start:stop])
                loss = ops.kd_loss(logits, self.teacher_logits[start:stop], self.temperature) \
                    + F.cross_entropy(logits, self.targets[start:stop])
                grads = iter(torch.autograd.grad(loss, flat))
                for total, entries in zip(sums, params):
                    gate = sum(_channel_sum(p, next(grads), dim) for p, dim in entries)
                    total += gate.double() ** 2
                batches += 1
        return {m: total / batches for m, total in zip(modules, sums)}

    def refresh(self, model: nn.Module, groups) -> None:
        self.scores = self.gate_scores(model, [m for g in groups for m in _gate_modules(g)])

    def __call__(self, group) -> torch.Tensor:
        size = len(group[0].idxs)
        total = torch.zeros(size, dtype=torch.float64)
        for module in _gate_modules(group):
            for item in group:
                if item.dep.target.module is module:
                    _scatter(total, item, self.scores[module].cpu())
                    break
        return total


def _scatter(total: torch.Tensor, item, local: torch.Tensor) -> None:
    """Adds a layer's per-channel scores (its own channel order) into the group's (the root's)."""
    pairs = [(i, r) for i, r in zip(item.idxs, item.root_idxs) if r is not None]
    if pairs:
        idxs, roots = zip(*pairs)
        total.index_add_(0, torch.tensor(roots), local[list(idxs)].to(total.dtype))


class MagnitudeImportance:
    """Torch-Pruning's group magnitude: per channel, the mean over the coupled layers of the
    squared L2 norm of its weights; no per-group normalization, so scores rank globally."""

    def __init__(self):
        self._score = torch_pruning().importance.GroupMagnitudeImportance(
            p=2, group_reduction="mean", normalizer=None)

    def __call__(self, group) -> torch.Tensor:
        return self._score(group).double().cpu()


class RandomImportance:
    """Uniform random scores from a private generator seeded with `seed` (the baseline)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator, dtype=torch.float64)


# =============================================================================================
# Latency: end to end, and the per-layer lookup table.
# =============================================================================================
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latencies(models, example_inputs: torch.Tensor, repeats: int = 30,
                      warmup: int = 5) -> list:
    """Median milliseconds of one forward of `example_inputs` through each of `models` (eval
    mode, no grad, on the first one's device), measured interleaved: every round runs each
    model once, so that a change in the machine's load touches all of them alike. The models'
    modes and flags are left as they were."""
    device = model_device(models[0])
    example_inputs = example_inputs.to(device)
    samples = [[] for _ in models]
    with torch.no_grad(), frozen(*models):
        for round_ in range(warmup + repeats):
            for model, times in zip(models, samples):
                _synchronize(device)
                start = time.perf_counter()
                model(example_inputs)
                _synchronize(device)
                if round_ >= warmup:
                    times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(times) for times in samples]


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, repeats: int = 30,
                    warmup: int = 5) -> float:
    """Median milliseconds of one forward of `example_inputs` (see `measure_latencies`)."""
    return measure_latencies([model], example_inputs, repeats, warmup)[0]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device=None) -> dict:
    """What a latency measurement depends on besides the layer: the device kind and model, and
    on CPUs the intra-op thread count."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index),
                "capability": f"{major}.{minor}"}
    if device.type == "cpu":
        return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}
    return {"type": device.type}


def _grid(channels: int, points: int) -> tuple:
    return tuple(sorted({max(1, round(1 + (channels - 1) * i / max(points - 1, 1)))
                         for i in range(points)}))


def _interpolate(grid: tuple, values: list, x: float) -> float:
    if len(grid) == 1 or x <= grid[0]:
        return values[0]
    if x >= grid[-1]:
        return values[-1]
    i = bisect.bisect_right(grid, x) - 1
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    return values[i] + w * (values[i + 1] - values[i])


@dataclass(frozen=True)
class LayerLatency:
    """Milliseconds of one layer at reduced channel counts: `ms[i][j]` at `in_grid[i]` inputs
    and `out_grid[j]` outputs (a depthwise layer has one row: its inputs follow its outputs)."""
    in_grid: tuple
    out_grid: tuple
    ms: tuple

    def at(self, c_in: float, c_out: float) -> float:
        """Bilinear interpolation on the grid (constant beyond it)."""
        row = [_interpolate(self.out_grid, list(values), c_out) for values in self.ms]
        return _interpolate(self.in_grid, row, c_in)


def _reduced_layer(key: LayerKey, c_in: int, c_out: int) -> nn.Module:
    if key.kind == "linear":
        return nn.Linear(c_in, c_out, bias=key.bias)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(key.kernel)]
    groups = c_out if key.depthwise else key.groups
    return conv(c_out if key.depthwise else c_in, c_out, key.kernel, key.stride, key.padding,
                key.dilation, groups, bias=key.bias)


def _timed_latency(device, dtype, repeats: int, warmup: int):
    """latency_fn(key, c_in, c_out) -> median ms of a fresh layer of that shape on `device`."""
    def latency(key: LayerKey, c_in: int, c_out: int) -> float:
        layer = _reduced_layer(key, c_in, c_out).to(device=device, dtype=dtype).eval()
        channels = c_out if key.depthwise else c_in
        shape = (key.batch, channels, *key.feature_map) if key.kind == "conv" else \
            (key.batch, *key.feature_map, channels)
        return measure_latency(layer, torch.randn(shape, device=device, dtype=dtype), repeats,
                               warmup)
    return latency


class LatencyTable:
    """Per-layer latency lookup table (HALP's): for every distinct convolution / linear layer
    shape (`LayerKey`) of a network on its example inputs, milliseconds on a grid of reduced
    channel counts, on one device (`device`: `device_description`) and dtype.

        table = LatencyTable.measure(model, example_inputs)   # on the model's device
        table.save("table.json"); table = LatencyTable.load("table.json")
        prune(model, images, latency_table=table, eta=1.0)     # or latency_ratio=0.5

    A table measured on another device, thread count or dtype, or for other layer shapes, is
    refused where it would be used (`check`); `load` refuses one of another device.
    """

    def __init__(self, device: dict, dtype: str, entries: dict):
        self.device, self.dtype, self.entries = dict(device), str(dtype), dict(entries)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def tabulate(cls, model: nn.Module, example_inputs: torch.Tensor, latency_fn, device=None,
                 points: int = 8, progress: bool = False) -> "LatencyTable":
        """A table from `latency_fn(key, c_in, c_out) -> ms` (a timer, or a device model such as
        an analytical or simulated one), on `points` channel counts per dimension from 1 to the
        layer's own, for every distinct layer of `model` on `example_inputs`. `device`: the
        device the numbers describe (default: the model's)."""
        if points < 2:
            raise ValueError(f"points must be >= 2, got {points}")
        device = torch.device(device) if device is not None else model_device(model)
        keys = list(dict.fromkeys(layer.key for layer in
                                  _trace_layers(model, example_inputs.to(model_device(model)))
                                  .values() if layer.key is not None))
        if not keys:
            raise ValueError(f"{type(model).__name__} has no convolution or linear layer to "
                             "measure")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(keys), desc="latency table", unit="layer", dynamic_ncols=True)
        entries = {}
        try:
            for key in keys:
                in_grid = (key.in_channels,) if key.depthwise else _grid(key.in_channels, points)
                out_grid = _grid(key.out_channels, points)
                ms = tuple(tuple(float(latency_fn(key, c_in, c_out)) for c_out in out_grid)
                           for c_in in in_grid)
                entries[key] = LayerLatency(in_grid, out_grid, ms)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return cls(device_description(device), str(model_dtype(model)).replace("torch.", ""),
                   entries)

    @classmethod
    def measure(cls, model: nn.Module, example_inputs: torch.Tensor, device=None,
                points: int = 8, repeats: int = 10, warmup: int = 3, passes: int = 3,
                cache_dir=None, progress: bool = False) -> "LatencyTable":
        """Measures the table on `device` (default: the model's), at the batch of
        `example_inputs`: each layer shape at each grid point is a fresh layer timed `repeats`
        times after `warmup` runs (median), in `passes` passes over the whole table, keeping
        each point's fastest pass (on a shared machine, a burst of another process's work then
        inflates one pass, not the table). With `cache_dir`, a table measured before for the
        same device, dtype, layer shapes and settings is read from there instead, and a new one
        is written there."""
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        device = torch.device(device) if device is not None else model_device(model)
        dtype = model_dtype(model)
        path = None
        if cache_dir is not None:
            keys = sorted(json.dumps(layer.key.to_json(), sort_keys=True) for layer in
                          _trace_layers(model, example_inputs.to(model_device(model))).values()
                          if layer.key is not None)
            identity = json.dumps([device_description(device), str(dtype), points, repeats,
                                   warmup, passes, keys], sort_keys=True)
            digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
            path = os.path.join(os.fspath(cache_dir), f"latency-{device.type}-{digest}.json")
            if os.path.exists(path):
                return cls.load(path)
        timer = _timed_latency(device, dtype, repeats, warmup)
        tables = [cls.tabulate(model, example_inputs, timer, device, points, progress)
                  for _ in range(passes)]
        table = cls(tables[0].device, tables[0].dtype, {
            key: LayerLatency(entry.in_grid, entry.out_grid, tuple(
                tuple(min(values) for values in zip(*rows))
                for rows in zip(*(t.entries[key].ms for t in tables))))
            for key, entry in tables[0].entries.items()})
        if path is not None:
            table.save(path)
        return table

    # -- using -------------------------------------------------------------------------------
    def latency(self, key: LayerKey, c_in: float, c_out: float) -> float:
        """Milliseconds of the layer `key` reduced to (c_in, c_out) channels."""
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(f"the latency table has no layer {key}")
        return entry.at(c_in, c_out)

    def check(self, keys: dict, device, dtype) -> None:
        """ValueError unless the table was measured on `device` (this machine's) in `dtype` and
        has every layer of `keys` ({name: LayerKey})."""
        here = device_description(device)
        dtype = str(dtype).replace("torch.", "")
        if self.device != here or self.dtype != dtype:
            raise ValueError(f"the latency table was measured on {_describe(self.device)} in "
                             f"{self.dtype}, but the model runs on {_describe(here)} in {dtype}: "
                             "measure one here (LatencyTable.measure)")
        missing = [name for name, key in keys.items() if key not in self.entries]
        if missing:
            raise ValueError(f"the latency table has no entry for layer {missing[0]} "
                             f"({keys[missing[0]]}) and {len(missing) - 1} more: it was measured "
                             "for another network or input shape")

    # -- files -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "device": self.device, "dtype": self.dtype,
                "entries": [{"key": key.to_json(), "in_grid": list(e.in_grid),
                             "out_grid": list(e.out_grid), "ms": [list(row) for row in e.ms]}
                            for key, e in self.entries.items()]}

    def save(self, path) -> None:
        """JSON, written atomically."""
        atomic_json(self.to_json(), path)

    @classmethod
    def load(cls, path, check_device: bool = True) -> "LatencyTable":
        """A table saved by `save`; with `check_device`, ValueError unless it was measured on
        this machine's device of its kind (same model, and on CPUs the same thread count)."""
        try:
            with open(path) as f:
                data = json.load(f)
            entries = {LayerKey.from_json(e["key"]): LayerLatency(
                tuple(e["in_grid"]), tuple(e["out_grid"]), tuple(tuple(r) for r in e["ms"]))
                for e in data["entries"]}
            table = cls(data["device"], data["dtype"], entries)
        except (OSError, ValueError, KeyError, TypeError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise DamagedFile(f"{path} is not a dinv latency table ({error})") from error
        if data.get("format") != TABLE_FORMAT:
            raise DamagedFile(f"{path} is not a dinv latency table")
        if check_device:
            kind = table.device.get("type")
            here = None if kind == "cuda" and not torch.cuda.is_available() else \
                device_description(kind)
            if here != table.device:
                raise ValueError(f"{path} was measured on {_describe(table.device)}, not on this "
                                 f"machine ({_describe(here) if here else f'no {kind} device'}): "
                                 "measure a table here")
        return table


def _describe(device: dict) -> str:
    text = f"{device.get('type')}: {device.get('name', '?')}"
    return text + (f", {device['threads']} threads" if "threads" in device else "")


# =============================================================================================
# prune()
# =============================================================================================
@dataclass
class PruneResult:
    """What `prune` returns. model: the pruned copy (eval mode). macs, params, latency: (before,
    after); latency in ms, measured end to end on the example inputs. table_latency: (before,
    after) by the latency table, when one was given. channels: {layer: (outputs before, after)}
    for every convolution / linear / norm layer. history: one row per step."""
    model: nn.Module
    macs: tuple
    params: tuple
    latency: tuple
    channels: dict
    target: dict
    importance: str
    eta: float
    steps: int
    table_latency: tuple | None = None
    history: list = field(default_factory=list)

    def ratios(self) -> dict:
        """after / before of each measure."""
        pairs = {"macs": self.macs, "params": self.params, "latency": self.latency}
        if self.table_latency is not None:
            pairs["table_latency"] = self.table_latency
        return {name: after / before for name, (before, after) in pairs.items()}

    def to_json(self) -> dict:
        """Everything but the model, JSON-able."""
        return {"target": self.target, "importance": self.importance, "eta": self.eta,
                "steps": self.steps, "macs": list(self.macs), "params": list(self.params),
                "latency_ms": list(self.latency),
                "table_latency_ms": None if self.table_latency is None
                else list(self.table_latency),
                "ratios": self.ratios(),
                "channels": {name: list(pair) for name, pair in self.channels.items()},
                "history": self.history}


def _target(ratios: dict) -> tuple:
    given = {name: value for name, value in ratios.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give one target ratio, got {', '.join(f'{n}_ratio' for n in given)}")
    name, ratio = next(iter(given.items())) if given else ("macs", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{name}_ratio must be a number in (0, 1) (the fraction kept), "
                         f"got {ratio!r}")
    return name, float(ratio)


def _images_and_targets(images, targets):
    if isinstance(images, (str, os.PathLike)):
        images, labels = load_shards(images)
        targets = labels if targets is None else targets
    elif isinstance(images, (tuple, list)):
        images, labels = images
        targets = labels if targets is None else targets
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or \
            images.dim() < 2 or len(images) == 0:
        raise ValueError("images must be a non-empty floating-point tensor [N, ...], an "
                         "(images, labels) pair or a synthesized dataset folder, got "
                         f"{type(images).__name__}"
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}")
    if targets is not None:
        targets = torch.as_tensor(targets)
        if targets.shape != (len(images),) or targets.is_floating_point():
            raise ValueError(f"targets must be one class index per image ({len(images)}), got "
                             f"shape {tuple(targets.shape)} {targets.dtype}")
    return images, targets


def _check_inputs(model, images, example_inputs) -> None:
    if example_inputs.shape[1:] != images.shape[1:]:
        raise ValueError(f"images are {tuple(images.shape[1:])} but example_inputs are "
                         f"{tuple(example_inputs.shape[1:])}")
    try:
        with torch.no_grad(), frozen(model):
            out = model(example_inputs)
    except Exception as error:  # noqa: BLE001 - any failure means the shapes do not fit
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit "
                         f"{type(model).__name__} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"{type(model).__name__} must return class logits [N, classes]")


def _criterion(importance, teacher, images, targets, seed, temperature, batch_size):
    if not isinstance(importance, str):
        return importance
    if importance == "taylor":
        return TaylorImportance(teacher, images, targets, temperature, batch_size)
    if importance == "magnitude":
        return MagnitudeImportance()
    if importance == "random":
        return RandomImportance(seed if seed is not None
                                else int(torch.randint(2 ** 62, (1,)).item()))
    raise ValueError(f"importance must be one of {', '.join(CRITERIA)} or an Importance, got "
                     f"{importance!r}")


def _ignored_modules(model: nn.Module, copy_: nn.Module, ignored_layers, layers: dict) -> list:
    """The copy's modules matching the user's (modules of `model` or names), every submodule of
    them, and the classifier (the last convolution / linear layer the forward ran)."""
    names = {m: n for n, m in model.named_modules()}
    modules = dict(copy_.named_modules())
    chosen = []
    for layer in ignored_layers or ():
        name = layer if isinstance(layer, str) else names.get(layer)
        if name not in modules:
            raise ValueError(f"ignored_layers: {layer!r} is not a module of the model")
        chosen.extend(modules[name].modules())
    classifier = [layer.module for layer in layers.values() if layer.kind != "norm"][-1]
    return chosen + [classifier]


def _scores(groups: list, criterion, eta: float, latency: _Cost | None) -> list:
    # Torch-Pruning's criteria return None for a group without weights they score.
    raw = [torch.zeros(g.size, dtype=torch.float64) if s is None
           else s.detach().double().cpu().reshape(-1)
           for g, s in ((g, criterion(g.group)) for g in groups)]
    mean = torch.cat(raw).mean()
    scores = [s / mean for s in raw] if mean > 0 else raw
    if eta:
        savings = [torch.full((g.size,), g.saving(latency), dtype=torch.float64) for g in groups]
        mean_saving = torch.cat(savings).mean()
        if mean_saving > 0:
            scores = [s - eta * d / mean_saving for s, d in zip(scores, savings)]
    return scores


def prune(model: nn.Module, images, *, targets=None, example_inputs=None, macs_ratio=None,
          params_ratio=None, latency_ratio=None, channels_ratio=None, importance="taylor",
          latency_table: LatencyTable | None = None, eta: float = 0.0, steps: int = 5,
          ignored_layers=None, seed=None, temperature: float = 4.0, batch_size: int = 64,
          progress: bool = False) -> PruneResult:
    """Prunes a copy of `model` (see the module doc); `model` is left bit-identical.

    images: synthesized images in the model's normalized input space: a tensor [N, C, H, W],
        (images, labels) or a `synthesize_dataset` folder. targets: their synthesis labels
        (default: the pair's / folder's labels, else the model's predictions).
    example_inputs: the inputs MACs and latency are measured on, and the batch of the latency
        table (default: the first image).
    macs_ratio | params_ratio | latency_ratio | channels_ratio: the fraction of the MACs,
        parameters, table latency or prunable channels to keep, in (0, 1); default macs 0.5.
    importance: "taylor", "magnitude", "random", or an Importance (callable: dependency group ->
        scores; one with a `refresh(model, groups)` method is refreshed before every step).
    latency_table, eta: hardware-aware ranking (eta > 0) and the latency target need a table
        measured for this model on its device.
    steps: how many times the channels are re-scored (iterative pruning).
    ignored_layers: modules of `model` (or their names) whose outputs are never pruned.
    seed: the random criterion's draws. temperature, batch_size: the Taylor criterion's.
    """
    tp = torch_pruning()
    target_name, ratio = _target(dict(zip(TARGETS, (macs_ratio, params_ratio, latency_ratio,
                                                    channels_ratio))))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if (eta > 0 or target_name == "latency") and latency_table is None:
        raise ValueError("hardware-aware pruning (eta > 0) and latency_ratio need a "
                         "latency_table (LatencyTable.measure(model, example_inputs))")
    device, dtype = model_device(model), model_dtype(model)
    images, targets = _images_and_targets(images, targets)
    images = images.to(device=device, dtype=dtype)
    example_inputs = images[:1] if example_inputs is None else \
        example_inputs.to(device=device, dtype=dtype)
    _check_inputs(model, images, example_inputs)
    targets = None if targets is None else targets.to(device)

    pruned = copy.deepcopy(model).eval()
    layers = _trace_layers(pruned, example_inputs)
    if latency_table is not None:
        latency_table.check({layer.name: layer.key for layer in layers.values()
                             if layer.key is not None}, device, dtype)
    if not any(layer.kind != "norm" for layer in layers.values()):
        raise ValueError(f"{type(model).__name__} has no prunable layer (convolution or linear)")
    ignored = _ignored_modules(model, pruned, ignored_layers, layers)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_inputs,
                                                  verbose=False)
    groups = _dependency_groups(graph, layers, ignored)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable layer: every convolution / "
                         "linear layer is the classifier or ignored")
    cost = _Cost(target_name, latency_table)
    if target_name == "params":
        cost.constant = count_params(pruned) - _total_cost(layers, groups, cost)
    table_cost = None if latency_table is None else _Cost("latency", latency_table)
    full = _total_cost(layers, groups, cost)
    goal = ratio * full
    smallest = full - sum(_simulate_smallest(g, cost) for g in groups)
    for layer in layers.values():
        layer.sync()
    if smallest > goal * (1 + 1e-9):
        raise ValueError(f"{target_name}_ratio={ratio} is out of reach: keeping one channel per "
                         f"group leaves {smallest / full:.3f} of the {target_name}")
    criterion = _criterion(importance, model, images, targets, seed, temperature, batch_size)
    table_before = None if table_cost is None else _total_cost(layers, groups, table_cost)
    macs_before, params_before = count_macs(model, example_inputs), count_params(model)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"pruning to {ratio:g} of the {target_name}", unit="step",
                   dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            if hasattr(criterion, "refresh"):
                criterion.refresh(pruned, [g.group for g in groups])
            scores = _scores(groups, criterion, eta, table_cost)
            current = _total_cost(layers, groups, cost)
            step_goal = full - (full - goal) * step / steps
            for group, idxs in _select(groups, scores, cost, current, step_goal).items():
                module, handler = group.root()
                graph.get_pruning_group(module, handler, idxs).prune()
            for layer in layers.values():
                layer.sync()
            groups = _dependency_groups(graph, layers, ignored)
            history.append({"step": step, target_name: _total_cost(layers, groups, cost),
                            "macs": count_macs(pruned, example_inputs),
                            "params": count_params(pruned)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({target_name: f"{history[-1][target_name] / full:.3f}"})
    finally:
        if bar is not None:
            bar.close()
    before = {layer.name: layer.c_out for layer in _trace_layers(model, example_inputs).values()}
    channels = {layer.name: (int(before[layer.name]), int(layer.c_out))
                for layer in layers.values()}
    pruned.eval()
    return PruneResult(
        pruned, (macs_before, count_macs(pruned, example_inputs)),
        (params_before, count_params(pruned)),
        tuple(measure_latencies([model, pruned], example_inputs)),
        channels, {"measure": target_name, "ratio": ratio},
        importance if isinstance(importance, str) else type(importance).__name__, float(eta),
        steps, None if table_cost is None else
        (table_before, _total_cost(layers, groups, table_cost)), history)


def _simulate_smallest(group: _Group, cost: _Cost) -> float:
    """What removing all but one of the group's channels saves (simulated; call `sync` after)."""
    saved = 0.0
    for _ in range(group.size - 1):
        saved += group.saving(cost)
        group.remove_one()
    return saved


# =============================================================================================
# Saving and loading a pruned network without pickled code.
# =============================================================================================
_SHAPE_ATTRIBUTES = {nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
                     nn.Linear: ("in_features", "out_features"),
                     nn.modules.batchnorm._BatchNorm: ("num_features",),
                     nn.GroupNorm: ("num_channels",), nn.LayerNorm: ("normalized_shape",)}


def layer_shapes(model: nn.Module) -> dict:
    """{module name: {attribute: value}}: the channel attributes pruning changes."""
    shapes = {}
    for name, module in model.named_modules():
        for kind, attributes in _SHAPE_ATTRIBUTES.items():
            if isinstance(module, kind):
                shapes[name] = {a: list(v) if isinstance(v, tuple) else v
                                for a, v in ((a, getattr(module, a)) for a in attributes)}
    return shapes


def save_pruned(model: nn.Module, path, arch: str | None = None, num_classes=None,
                extra: dict | None = None) -> None:
    """Writes (atomically) the pruned network as its state_dict, its layer shapes and the
    architecture name `arch` (a `dinv.models.create` name) it is rebuilt from; `load_pruned`
    reads it with `torch.load(weights_only=True)`. extra: JSON-able metadata kept with it."""
    atomic_save({"format": PRUNED_FORMAT, "arch": arch, "num_classes": num_classes,
                 "shapes": layer_shapes(model), "state_dict": model.state_dict(),
                 "extra": extra or {}}, path)


def apply_shapes(model: nn.Module, shapes: dict, state_dict: dict) -> nn.Module:
    """Reshapes `model` in place to a pruned network's layer shapes and tensor shapes (so its
    state_dict loads strictly); returns it."""
    modules = dict(model.named_modules())
    for name, attributes in shapes.items():
        if name not in modules:
            raise ValueError(f"the pruned network has a layer {name!r} that "
                             f"{type(model).__name__} does not")
        for attribute, value in attributes.items():
            setattr(modules[name], attribute, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state_dict.items():
        owner, _, attribute = key.rpartition(".")
        module = modules.get(owner)
        current = None if module is None else getattr(module, attribute, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        replacement = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(module, attribute, nn.Parameter(replacement,
                                                    requires_grad=current.requires_grad))
        else:
            module._buffers[attribute] = replacement
    return model


def load_pruned(path, model: nn.Module | None = None) -> nn.Module:
    """The network `save_pruned` wrote, in eval mode on the CPU: rebuilt from its `arch` (or
    `model`, an unpruned instance of its architecture, reshaped in place)."""
    data = load_tensors(path)
    if not isinstance(data, dict) or data.get("format") != PRUNED_FORMAT:
        raise DamagedFile(f"{path} is not a pruned network saved by dinv.prune.save_pruned")
    if model is None:
        if not data.get("arch"):
            raise ValueError(f"{path} names no architecture: pass model= (an instance of it)")
        from .models import create

        model = create(data["arch"], num_classes=data.get("num_classes"))
    apply_shapes(model, data["shapes"], data["state_dict"])
    model.load_state_dict(data["state_dict"])
    return model.eval()
