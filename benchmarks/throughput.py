"""End-to-end DeepInversion speed: the NVlabs reference loop (eager, and torch.compile'd) against
cumulative dinv.Inverter configurations, per teacher workload, in one process.

    PYTHONPATH=. python benchmarks/throughput.py --quick            # a few minutes on 2 CPU cores
    PYTHONPATH=. python benchmarks/throughput.py                    # full (GPU: all workloads)
    PYTHONPATH=. python benchmarks/throughput.py --workloads digits --configs eager,ops,compile

What is timed: one optimization iteration (jitter, forward, losses, backward, Adam step, clip,
best-image bookkeeping, as each implementation does it), steady state, at full resolution
(reference setting 1 / dinv setting_id=1). Method, for noisy shared machines:
- every configuration of a workload lives in this process, each with its own deep copy of the
  teacher (nothing one installs on a teacher can affect another);
- a first call per configuration does the warm-up (compilation, allocator) and records the loss
  of iteration 1, which must agree across configurations (same start images, same jitter draws);
- then `rounds` rounds, each running every configuration for `warmup + iters` iterations in a
  rotated order; per-iteration times come from timestamps taken every `every` iterations (1 on
  CPU; 10 on GPU, with a synchronize), the first `warmup` iterations of each call are dropped, and
  the reported figure is the median of all kept samples; ratios compare medians of one run;
- memory is measured in one extra short call per configuration (see MEMORY_NOTE).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn, optim
from torch.utils._python_dispatch import TorchDispatchMode

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MEMORY_NOTE = {
    "cpu": "CPU: bytes the run allocates through torch's CPU allocator above the level at its "
           "start (torch.profiler profile_memory allocation events over a 3-iteration call; "
           "includes images, optimizer state, best-image copies, activations and teacher grads, "
           "excludes the teacher's weights)",
    "cuda": "GPU: torch.cuda.max_memory_allocated() during a 3-iteration call minus "
            "memory_allocated() at its start (same scope as on CPU)",
}


# =============================================================================================
# The baseline: NVlabs/DeepInversion deepinversion.py, written out here (not imported from dinv)
# =============================================================================================
class DeepInversionFeatureHook:
    """The reference's BN hook, verbatim: permute + contiguous copy for the variance."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(
            module.running_mean.data - mean, 2)
        self.r_feature = r_feature

    def close(self):
        self.hook.remove()


def get_image_prior_losses(inputs_jit):
    """The reference's TV prior, verbatim (both variants are always computed)."""
    diff1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
    diff2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
    diff3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
    diff4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
    loss_var_l2 = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    loss_var_l1 = loss_var_l1 * 255.0
    return loss_var_l1, loss_var_l2


def lr_cosine_policy(base_lr, warmup_length, epochs):
    def _lr_fn(iteration, epoch):
        if epoch < warmup_length:
            lr = base_lr * (epoch + 1) / warmup_length
        else:
            e = epoch - warmup_length
            es = epochs - warmup_length
            lr = 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr
        return lr

    def _alr(optimizer, iteration, epoch):
        lr = _lr_fn(iteration, epoch)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
    return _alr


def clip(image_tensor, mean, std):
    """The reference's per-channel clamp to the normalized [0, 1] pixel range."""
    for c in range(len(mean)):
        m, s = mean[c], std[c]
        image_tensor[:, c] = torch.clamp(image_tensor[:, c], -m / s, (1 - m) / s)
    return image_tensor


class ReferenceInversion:
    """`DeepInversionClass.get_images` of the reference, setting 1 (one full-resolution stage,
    Adam betas (0.5, 0.9), clipping), fp32, teacher in eval mode with its parameters still
    requiring grad, hooks on every BatchNorm2d, `optimizer.zero_grad(); net.zero_grad()` each
    iteration, torch.roll jitter + torch.flip, `loss.item()` and a clone of the images every
    iteration. `compile` wraps the forward+loss function in torch.compile (the strongest peer a
    user can build from the reference; jitter, backward and the step stay eager); `frozen` is the
    one-line user fix of not computing the teacher's weight gradients."""

    def __init__(self, teacher, image_shape, mean, std, *, r_feature, first_bn_multiplier, tv_l1,
                 tv_l2, l2, lr, main_loss_multiplier=1.0, jitter=30, flip=True, compile=False,
                 frozen=False):
        self.net_teacher = teacher.eval()
        self.teacher_requires_grad = not frozen
        self.loss_r_feature_layers = [DeepInversionFeatureHook(m) for m in teacher.modules()
                                      if isinstance(m, nn.BatchNorm2d)]
        self.image_shape, self.mean, self.std = tuple(image_shape), tuple(mean), tuple(std)
        self.bn_reg_scale = r_feature
        self.first_bn_multiplier = first_bn_multiplier
        self.var_scale_l1, self.var_scale_l2, self.l2_scale = tv_l1, tv_l2, l2
        self.lr = lr
        self.main_loss_multiplier = main_loss_multiplier
        self.jitter, self.flip = jitter, flip
        self.criterion = nn.CrossEntropyLoss()
        self.forward_loss = self._forward_loss
        if compile:
            self.forward_loss = torch.compile(self._forward_loss,
                                              mode=None if compile is True else compile)

    def _forward_loss(self, inputs_jit, targets):
        outputs = self.net_teacher(inputs_jit)
        loss = self.criterion(outputs, targets)
        loss_var_l1, loss_var_l2 = get_image_prior_losses(inputs_jit)
        rescale = [self.first_bn_multiplier] + [
            1. for _ in range(len(self.loss_r_feature_layers) - 1)]
        loss_r_feature = sum([mod.r_feature * rescale[idx]
                              for (idx, mod) in enumerate(self.loss_r_feature_layers)])
        loss_l2 = torch.norm(inputs_jit.view(inputs_jit.shape[0], -1), dim=1).mean()
        loss_aux = self.var_scale_l2 * loss_var_l2 + \
            self.var_scale_l1 * loss_var_l1 + \
            self.bn_reg_scale * loss_r_feature + \
            self.l2_scale * loss_l2
        return self.main_loss_multiplier * loss + loss_aux

    def get_images(self, targets, iterations, inputs, rng=random, callback=None, every=1):
        """`inputs`: the start images (the reference draws torch.randn); `rng`: the source of the
        jitter/flip draws (the reference uses the global `random` module); `callback(iteration,
        loss, images)` every `every` iterations (the harness's timestamps)."""
        # Runners share the teacher: set its parameters as this configuration has them.
        for p in self.net_teacher.parameters():
            p.requires_grad_(self.teacher_requires_grad)
        inputs = inputs.detach().clone().requires_grad_(True)
        optimizer = optim.Adam([inputs], lr=self.lr, betas=[0.5, 0.9], eps=1e-8)
        do_clip = True
        lr_scheduler = lr_cosine_policy(self.lr, 100, iterations)
        lim_0, lim_1 = self.jitter, self.jitter
        best_cost = 1e4
        best_inputs = None
        iteration = 0
        for iteration_loc in range(iterations):
            iteration += 1
            lr_scheduler(optimizer, iteration_loc, iteration_loc)
            inputs_jit = inputs
            off1 = rng.randint(-lim_0, lim_0)
            off2 = rng.randint(-lim_1, lim_1)
            inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
            flip = rng.random() > 0.5
            if flip and self.flip:
                inputs_jit = torch.flip(inputs_jit, dims=(3,))
            optimizer.zero_grad()
            self.net_teacher.zero_grad()
            loss = self.forward_loss(inputs_jit, targets)
            loss.backward()
            optimizer.step()
            if do_clip:
                inputs.data = clip(inputs.data, self.mean, self.std)
            if best_cost > loss.item() or iteration == 1:
                best_inputs = inputs.data.clone()
            if callback is not None and iteration % every == 0:
                callback(iteration, loss, inputs.detach())
        return best_inputs

    def close(self):
        for hook in self.loss_r_feature_layers:
            hook.close()


# =============================================================================================
# Workloads and configurations
# =============================================================================================
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyNet(nn.Module):
    """The smoke test's teacher: two conv-BN-ReLU, pooling, a linear layer."""

    def __init__(self, classes=5, channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _settle_running_stats(model, image_shape, batch=4, seed=0):
    """Untrained teachers: non-trivial running statistics from one train-mode forward of noise."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn((batch,) + tuple(image_shape), generator=generator))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
            m.running_var.clamp_(min=1e-2)
    return model.eval()


def _build(name, image_shape):
    torch.manual_seed(0)
    if name == "digits":
        from dinv.models import load_digits_teacher
        return load_digits_teacher()
    if name == "tiny":
        return _settle_running_stats(TinyNet(), image_shape)
    if name == "resnet50":
        import torchvision
        return _settle_running_stats(torchvision.models.resnet50(weights=None), image_shape,
                                     batch=2)
    from dinv.models import create
    return _settle_running_stats(create(name), image_shape)


@dataclass
class Workload:
    name: str
    image_shape: tuple
    mean: tuple
    std: tuple
    batch: int
    classes: int
    coefficients: dict          # Inverter / reference loss weights and lr
    jitter: int
    flip: bool
    rounds: int = 3
    iters: int = 3

    def teacher(self) -> nn.Module:
        return _build(self.name, self.image_shape)


def _coef(lr, r_feature, first_bn_multiplier, tv_l1, tv_l2, l2):
    return dict(lr=lr, r_feature=r_feature, first_bn_multiplier=first_bn_multiplier,
                tv_l1=tv_l1, tv_l2=tv_l2, l2=l2)


def workloads(device: str, quick: bool) -> dict:
    """Every workload, with its batch and run length for this device and mode."""
    from dinv.presets import IMAGENET, digits_settings

    gpu = device == "cuda"
    d = digits_settings()
    cifar = _coef(0.1, 0.01, 10.0, 0.0, 1e-4, 1e-5)
    imagenet = _coef(*(IMAGENET[k] for k in ("lr", "r_feature", "first_bn_multiplier", "tv_l1",
                                              "tv_l2", "l2")))
    long_run = dict(rounds=5, iters=20) if gpu else dict(rounds=5, iters=8)
    short = dict(rounds=3, iters=20) if gpu else dict(rounds=3, iters=3)
    heavy_short = dict(rounds=3, iters=10) if gpu else dict(rounds=2, iters=2)
    run = (lambda heavy: heavy_short if heavy else short) if quick else (lambda heavy: long_run)
    return {
        "tiny": Workload("tiny", (3, 8, 8), CIFAR_MEAN, CIFAR_STD, 4, 5,
                         _coef(0.1, 0.05, 10.0, 1e-3, 1e-3, 1e-4), 1, True, rounds=1, iters=2),
        "digits": Workload("digits", d["image_shape"], d["mean"], d["std"], 200, 10,
                           _coef(*(d[k] for k in ("lr", "r_feature", "first_bn_multiplier",
                                                  "tv_l1", "tv_l2", "l2"))),
                           d["jitter"], d["flip"], **run(False)),
        "resnet18_cifar": Workload("resnet18_cifar", (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                                   64 if (quick and not gpu) else 256, 10, cifar, 2, True,
                                   **run(True)),
        "resnet34_cifar": Workload("resnet34_cifar", (3, 32, 32), CIFAR_MEAN, CIFAR_STD, 256, 10,
                                   cifar, 2, True, **run(True)),
        "resnet50": Workload("resnet50", (3, 224, 224), IMAGENET["mean"], IMAGENET["std"],
                             (16 if quick else 64) if gpu else (2 if quick else 16), 1000,
                             imagenet, 30, True, **run(True)),
    }


def default_workloads(device: str, quick: bool) -> list:
    if device == "cuda":
        return ["digits", "resnet18_cifar", "resnet34_cifar", "resnet50"]
    return ["digits", "resnet18_cifar"] if quick else \
        ["digits", "resnet18_cifar", "resnet34_cifar", "resnet50"]


@dataclass(frozen=True)
class Config:
    name: str
    kind: str                   # "reference" or "dinv"
    label: str
    options: tuple = ()         # (key, value) pairs for the constructor
    gpu_only: bool = False

    @property
    def compiles(self) -> bool:
        return bool(dict(self.options).get("compile"))


def configs(amp_dtype: torch.dtype) -> list:
    """The baselines, then dinv's options added one at a time (each row keeps the ones above)."""
    base = (("fused_bn", False),)
    fused = (("fused_bn", True),)
    cl = fused + (("channels_last", True),)
    amp = cl + (("amp_dtype", amp_dtype),)
    return [
        Config("eager", "reference", "reference loop, eager fp32"),
        Config("ref-compile", "reference", "reference loop, torch.compile(forward+loss)",
               (("compile", True),)),
        Config("ref-compile-frozen", "reference",
               "reference loop, teacher frozen, torch.compile(forward+loss)",
               (("compile", True), ("frozen", True))),
        Config("ops", "dinv", "dinv: fused ops (hooks + channel_stats)", base),
        Config("fused-bn", "dinv", "dinv: + fused BN (fused_bn=True)", fused),
        Config("channels-last", "dinv", "dinv: + channels_last", cl),
        Config("amp", "dinv", "dinv: + autocast", amp, gpu_only=True),
        # On CPU (no autocast row) "compile" stacks on channels-last; on GPU on amp.
        Config("compile", "dinv", "dinv: + compile=True", (("compile", True),)),
        Config("cudagraphs", "dinv", "dinv: + compile='reduce-overhead' (CUDA graphs)",
               (("compile", "reduce-overhead"),), gpu_only=True),
    ]


def resolve_options(config: Config, device: str, amp_dtype) -> dict:
    """A compile row's options: the previous dinv row's (channels-last on CPU, amp on GPU) plus
    its compile mode."""
    options = dict(config.options)
    if config.kind == "dinv" and "compile" in options:
        options = dict(fused_bn=True, channels_last=True, compile=options["compile"])
        if device == "cuda":
            options["amp_dtype"] = amp_dtype
    return options


# =============================================================================================
# Runners: one per (workload, config), each owning a deep copy of the teacher
# =============================================================================================
@contextlib.contextmanager
def dinv_jitter_seed(seed: int):
    """Makes dinv draw its jitter/flip from random.Random(seed), the reference's draw order, so
    every configuration sees the same augmented views. (Affects only where the draws come from,
    not what an iteration costs.)"""
    import dinv.inverter as module

    original = getattr(module, "JitterFlip", None)
    if original is None:  # the library changed how it draws; views then differ across configs
        yield False
        return

    class SeededJitterFlip(original):
        def __init__(self, limit, flip, _seed):
            super().__init__(limit, flip, seed)

    module.JitterFlip = SeededJitterFlip
    try:
        yield True
    finally:
        module.JitterFlip = original


class ReferenceRunner:
    def __init__(self, teacher, workload: Workload, options: dict):
        self.workload = workload
        self.impl = ReferenceInversion(teacher, workload.image_shape, workload.mean, workload.std,
                                       jitter=workload.jitter, flip=workload.flip,
                                       compile=options.get("compile", False),
                                       frozen=options.get("frozen", False),
                                       **workload.coefficients)

    def run(self, targets, iterations, init, seed, callback, every):
        self.impl.get_images(targets, iterations, init, random.Random(seed),
                             callback=callback, every=every)
        self.impl.net_teacher.zero_grad(set_to_none=True)  # housekeeping, outside the timed part

    def close(self):
        self.impl.close()


class DinvRunner:
    def __init__(self, teacher, workload: Workload, options: dict):
        from dinv import Inverter

        self.workload = workload
        c = workload.coefficients
        self.inv = Inverter(teacher, workload.image_shape, workload.mean, workload.std,
                            r_feature=c["r_feature"], first_bn_multiplier=c["first_bn_multiplier"],
                            tv_l1=c["tv_l1"], tv_l2=c["tv_l2"], l2=c["l2"], lr=c["lr"],
                            setting_id=1, clip=True, jitter=workload.jitter, flip=workload.flip,
                            **options)

    def run(self, targets, iterations, init, seed, callback, every):
        from dinv.inverter import LossLog

        self.inv.log_every = every
        self.inv.log = LossLog()
        with dinv_jitter_seed(seed):
            self.inv.invert(targets, iterations=iterations, seed=seed, init=init,
                            callback=lambda i, images, terms: callback(i, terms["loss"], images))

    def close(self):
        self.inv.close()


def make_runner(config: Config, teacher, workload: Workload, options: dict):
    cls = ReferenceRunner if config.kind == "reference" else DinvRunner
    return cls(teacher, workload, options)


# =============================================================================================
# Measurement
# =============================================================================================
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(runner, device, targets, iterations, init, seed, every, want_loss=False):
    """Runs one call; returns (seconds from call start to each timestamp, iteration of each,
    loss at the first timestamp)."""
    stamps, its, losses = [], [], []

    def callback(iteration, loss, images):
        _sync(device)
        stamps.append(time.perf_counter())
        its.append(iteration)
        if want_loss and not losses:
            losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))

    _sync(device)
    start = time.perf_counter()
    runner.run(targets, iterations, init, seed, callback, every)
    return [s - start for s in stamps], its, (losses[0] if losses else None)


def steady_samples(stamps, its, warmup):
    """Per-iteration seconds of each chunk between timestamps, after the first `warmup`
    iterations."""
    samples = []
    for k in range(1, len(stamps)):
        if its[k - 1] >= warmup:
            samples.append((stamps[k] - stamps[k - 1]) / (its[k] - its[k - 1]))
    return samples


def _alloc_events(prof):
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    return events


def measure_memory(runner, device, targets, init, seed):
    """Peak bytes allocated by a 3-iteration call above the level at its start (MEMORY_NOTE)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run(targets, 3, init, seed, lambda *a: None, 1)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.run(targets, 3, init, seed, lambda *a: None, 1)
    live = peak = 0
    for _, size in _alloc_events(prof):
        live += size
        peak = max(peak, live)
    return peak


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while `on`, leaving out views and host reads of a value
    (neither launches a kernel)."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(runner, targets, init, seed) -> int:
    """aten ops dispatched in iteration 2 of a 3-iteration call. On a GPU each is at least one
    kernel launch, so this is the eager launch count that fused ops and batched loss tails cut
    (measurable on CPU). Not taken for compiled rows: the mode would change what Dynamo traces."""
    counter = _OpCounter()

    def callback(iteration, loss, images):
        counter.on = iteration == 1

    with counter:
        runner.run(targets, 3, init, seed, callback, 1)
    return counter.count


def count_flops(teacher, workload: Workload, device) -> int:
    """Conv/linear/matmul FLOPs of one forward plus the backward w.r.t. the input only (the
    teacher's weights get no gradient), for the workload's batch (counted on a batch of 2 and
    scaled: these FLOPs are linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    n = min(2, workload.batch)
    x = torch.randn((n,) + workload.image_shape, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return int(counter.get_total_flops() * workload.batch // n)


def matmul_peak(device, dtype=torch.float32, n=None, repeats=5) -> dict:
    """Measured matmul throughput (the machine's practical peak): best and median GFLOP/s."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "best_gflops": max(rates),
            "median_gflops": statistics.median(rates)}


def _dynamo_counters():
    try:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"].get("unique_graphs", 0),
                "breaks": sum(counters["graph_break"].values()),
                "recompiles": sum(counters["recompiles"].values()),
                # Warm-up times of compiled rows depend on these: a hit reuses a compilation
                # cached on disk by an earlier process (--cold-compile disables the caches).
                "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                "aot_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0)}
    except Exception:  # noqa: BLE001 - counters are diagnostics only
        return {}


@dataclass
class Result:
    workload: str
    config: str
    label: str
    device: str
    batch: int
    options: str
    status: str = "ok"
    s_per_it: float | None = None          # median steady-state seconds per iteration
    s_per_it_iqr: float | None = None      # interquartile range of the samples
    samples: int = 0
    img_it_per_s: float | None = None
    speedup_vs_eager: float | None = None  # eager s/it over this config's s/it (same run)
    gflops_achieved: float | None = None   # useful FLOPs (fwd + input-grad bwd) per second
    pct_of_peak: float | None = None       # CPU: % of the measured fp32 mm peak; GPU: MFU
    peak_mem_mb: float | None = None
    ops_per_it: int | None = None          # aten ops (kernel launches on GPU) per eager iteration
    warmup_s: float | None = None          # first iteration of the first call (compile included)
    later_first_it_s: float | None = None  # median first iteration of later calls (re-warm-up)
    loss_it1: float | None = None
    loss_rel_diff: float | None = None     # vs eager's loss at iteration 1, same views
    dynamo: dict = field(default_factory=dict)
    raw: list = field(default_factory=list)


def _median(values):
    return statistics.median(values) if values else None


def _iqr(values):
    if len(values) < 4:
        return None
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def profile_iteration(runner, device, targets, init, seed, rows) -> str:
    """torch.profiler table of iteration 2 of a 3-iteration call (ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities)

    def callback(iteration, loss, images):
        _sync(device)
        if iteration == 1:
            prof.start()
        elif iteration == 2:
            prof.stop()

    runner.run(targets, 3, init, seed, callback, 1)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


def bench_workload(workload: Workload, config_list, device, args, flops, log, profiles=None,
                   peak_samples=None):
    """All configurations of one workload, interleaved; returns [Result]."""
    profiles = profiles if profiles is not None else {}
    amp_dtype = args.amp_dtype_t
    base_teacher = workload.teacher()
    compile_ok = args.compile_workloads is None or workload.name in args.compile_workloads
    every = args.every or (10 if device == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else every
    rounds = args.rounds or workload.rounds
    iters = max(args.iters or workload.iters, every)
    iters = int(math.ceil(iters / every) * every)
    targets = (torch.arange(workload.batch) % workload.classes).to(device)

    def init_images(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn((workload.batch,) + workload.image_shape, generator=g).to(device)

    results, runners = {}, {}
    for config in config_list:
        options = resolve_options(config, device, amp_dtype)
        result = Result(workload.name, config.name, config.label, device, workload.batch,
                        ",".join(f"{k}={v}" for k, v in options.items()))
        results[config.name] = result
        if config.compiles and not compile_ok:
            result.status = "skipped (compile not run for this workload; --compile-workloads)"
            continue
        try:
            teacher = copy.deepcopy(base_teacher).to(device)
            runners[config.name] = make_runner(config, teacher, workload, options)
        except Exception as error:  # noqa: BLE001 - one broken configuration must not stop the run
            result.status = f"error: {type(error).__name__}: {error}"[:300]

    # Warm-up + iteration-1 loss check: same start images and views for every configuration.
    init0 = init_images(1234)
    for name, runner in list(runners.items()):
        result = results[name]
        before = _dynamo_counters()
        try:
            stamps, its, loss = timed_call(runner, device, targets, 2, init0, 1234, 1,
                                           want_loss=True)
            result.warmup_s, result.loss_it1 = stamps[0], loss
        except Exception as error:  # noqa: BLE001
            result.status = f"error: {type(error).__name__}: {error}"[:300]
            runners.pop(name).close()
            continue
        after = _dynamo_counters()
        result.dynamo = {k: after[k] - before.get(k, 0) for k in after}
        cached = (f"   (compile caches: {result.dynamo.get('fxgraph_cache_hit', 0)} hit, "
                  f"{result.dynamo.get('fxgraph_cache_miss', 0)} miss)"
                  if result.dynamo.get("graphs") else "")
        log(f"  {workload.name:15s} {name:14s} warm-up {stamps[0]:8.3f} s   "
            f"loss@1 {loss:.6g}{cached}")

    # Timed rounds, rotated order.
    samples = {name: [] for name in runners}
    later_first = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name not in runners:
                continue
            seed = 100 + r
            try:
                stamps, its, _ = timed_call(runners[name], device, targets, warmup + iters,
                                            init_images(seed), seed, every)
            except Exception as error:  # noqa: BLE001
                results[name].status = f"error: {type(error).__name__}: {error}"[:300]
                runners.pop(name).close()
                continue
            s = steady_samples(stamps, its, warmup)
            samples[name].extend(s)
            later_first[name].append(stamps[0] / its[0])
            results[name].raw.append([round(v, 6) for v in s])
        if device == "cpu" and peak_samples is not None:
            # The machine's speed drifts on a shared host: sample the matmul peak every round and
            # use the best sample of the whole run.
            peak_samples.append(matmul_peak(device, n=args.mm_size, repeats=2)["best_gflops"])
        log(f"  {workload.name:15s} round {r + 1}/{rounds}: " + "  ".join(
            f"{n} {(_median(samples[n]) or float('nan')) * 1e3:.1f}ms" for n in names
            if n in runners))

    if args.profile:
        for name, runner in runners.items():
            try:
                text = profile_iteration(runner, device, targets, init_images(8), 8,
                                         args.profile)
            except Exception as error:  # noqa: BLE001
                text = f"profile failed: {type(error).__name__}: {error}"
            profiles[(workload.name, name)] = text
            log(f"--- profile of one steady iteration: {workload.name} / {name}\n{text}")

    compiled = {c.name for c in config_list if c.compiles}
    for name, runner in list(runners.items()):
        if name not in compiled:
            results[name].ops_per_it = count_ops(runner, targets, init_images(6), 6)
        if args.no_memory:
            runner.close()
            continue
        try:
            results[name].peak_mem_mb = measure_memory(runner, device, targets, init_images(7),
                                                       7) / 2 ** 20
        except Exception as error:  # noqa: BLE001
            results[name].status = f"ok (memory: {type(error).__name__}: {error})"[:300]
        runner.close()
    runners.clear()

    eager = results.get("eager")
    eager_s = _median(samples.get("eager", []))
    for name, result in results.items():
        values = samples.get(name, [])
        if not values:
            if result.status == "ok":
                result.status = "no samples"
            continue
        result.s_per_it = _median(values)
        result.s_per_it_iqr = _iqr(values)
        result.samples = len(values)
        result.img_it_per_s = workload.batch / result.s_per_it
        result.later_first_it_s = _median(later_first[name])
        if eager_s:
            result.speedup_vs_eager = eager_s / result.s_per_it
        if flops:
            result.gflops_achieved = flops / result.s_per_it / 1e9
        if eager is not None and eager.loss_it1 and result.loss_it1 is not None:
            result.loss_rel_diff = abs(result.loss_it1 - eager.loss_it1) / abs(eager.loss_it1)
    return list(results.values())


# =============================================================================================
# Reporting
# =============================================================================================
def machine_info(device, args) -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        from dinv.ops import _backends

        x = torch.empty(1, device=device)
        info["dinv_backend"] = _backends.select(x)
        info["dinv_backends"] = _backends.explain(x)
    except Exception as error:  # noqa: BLE001
        info["dinv_backend"] = f"unknown ({error})"
    return info


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = [("workload", "workload", 15, "s"), ("config", "config", 14, "s"),
           ("batch", "batch", 5, "d"), ("s_per_it", "ms/it", 9, None),
           ("img_it_per_s", "img*it/s", 9, ".1f"), ("speedup_vs_eager", "x eager", 7, ".2f"),
           ("gflops_achieved", "GFLOP/s", 8, ".1f"), ("pct_of_peak", "%peak", 6, ".1f"),
           ("peak_mem_mb", "mem MB", 8, ".1f"), ("ops_per_it", "ops/it", 6, "d"),
           ("warmup_s", "warmup s", 8, ".2f"),
           ("later_first_it_s", "1st-it s", 8, ".3f"), ("loss_rel_diff", "dloss@1", 8, ".1e")]


def table(results, device) -> str:
    head = "  ".join(f"{title:>{width}s}" if spec != "s" else f"{title:<{width}s}"
                     for _, title, width, spec in COLUMNS)
    if device == "cuda":
        head = head.replace(" %peak", "   MFU")
    lines = [head, "-" * len(head)]
    for r in results:
        cells = []
        for key, _, width, spec in COLUMNS:
            value = getattr(r, key)
            if key == "s_per_it":
                text = _fmt(None if value is None else value * 1e3, ".1f")
            else:
                text = _fmt(value, spec if spec != "s" else "")
            cells.append(f"{text:<{width}s}" if spec == "s" else f"{text:>{width}s}")
        line = "  ".join(cells)
        if r.status != "ok":
            line += f"  [{r.status}]"
        lines.append(line)
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, results, meta) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    rows = [asdict(r) for r in results]
    keys = [k for k in rows[0] if k not in ("raw", "dynamo")] + ["dynamo"] if rows else []
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "dynamo": json.dumps(row["dynamo"])})
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
    plot(results, paths["png"], meta)
    return paths


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [w for w in dict.fromkeys(r.workload for r in results)]
    names = [c for c in dict.fromkeys(r.config for r in results)]
    value = {(r.workload, r.config): r.speedup_vs_eager for r in results}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(loads) * max(1, len(names)) / 3), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(loads))]
        ys = [value.get((w, name)) or 0.0 for w in loads]
        bars = ax.bar(xs, ys, width, label=name)
        for bar, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(loads)))
    ax.set_xticklabels(loads)
    ax.set_ylabel("speed-up vs eager reference (same run)")
    where = meta.get("gpu") or meta.get("cpu")
    ax.set_title(f"DeepInversion iteration, {where}, {meta.get('threads')} thread(s), "
                 f"torch {meta.get('torch')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, small batches on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workloads", default=None,
                   help="comma list of tiny,digits,resnet18_cifar,resnet34_cifar,resnet50")
    p.add_argument("--configs", default=None, help="comma list of configuration names")
    p.add_argument("--compile-workloads", default=None,
                   help="workloads whose compile rows run ('all' / 'none'); default: all, but "
                        "only digits on CPU with --quick (CPU compiles of ResNets take minutes)")
    p.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per call")
    p.add_argument("--warmup", type=int, default=None,
                   help="iterations dropped at the start of each call (default: --every)")
    p.add_argument("--every", type=int, default=None,
                   help="iterations between timestamps (default 1 on CPU, 10 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="GPU dense bf16 peak for MFU (default: H100 SXM)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable torch.compile's on-disk caches, so that the compiled rows' "
                        "warm-up is a first compilation (default: whatever the caches hold)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print (and save) a torch.profiler table of one steady iteration "
                        "per configuration, ROWS ops by self time")
    p.add_argument("--mm-size", type=int, default=None,
                   help="matrix size of the peak matmul (default 2048 CPU, 8192 GPU)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="file stem (default throughput-<device>[-quick])")
    args = p.parse_args(argv)
    args.amp_dtype_t = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return args


def main(argv=None, log=print):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    available = workloads(device, args.quick)
    chosen = args.workloads.split(",") if args.workloads else default_workloads(device, args.quick)
    unknown = [w for w in chosen if w not in available]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(available)}")
    if args.compile_workloads is None:
        args.compile_workloads = ["digits", "tiny"] if (device == "cpu" and args.quick) else None
    elif args.compile_workloads == "all":
        args.compile_workloads = None
    elif args.compile_workloads == "none":
        args.compile_workloads = []
    else:
        args.compile_workloads = args.compile_workloads.split(",")
    config_list = [c for c in configs(args.amp_dtype_t) if device == "cuda" or not c.gpu_only]
    if args.configs:
        wanted = args.configs.split(",")
        known = {c.name for c in configs(args.amp_dtype_t)}
        if set(wanted) - known:
            raise SystemExit(f"unknown configs {sorted(set(wanted) - known)}; "
                             f"known: {sorted(known)}")
        config_list = [c for c in config_list if c.name in wanted]
    if not any(c.name == "eager" for c in config_list):
        log("note: without the 'eager' configuration there are no speed-up ratios")

    meta = machine_info(device, args)
    log(f"# DeepInversion throughput  {meta['date']}  torch {meta['torch']}  device {device}"
        f"  ({meta.get('gpu') or meta['cpu']}, {meta['threads']} threads, "
        f"{meta['cpu_count']} CPUs, load avg {meta.get('loadavg_start')})")
    log(f"# dinv backend for {device} fp32 tensors: {meta['dinv_backend']}")
    if device == "cuda":
        peak = {"source": "--peak-tflops (dense bf16)", "gflops": args.peak_tflops * 1e3}
        try:
            peak["measured_bf16_mm"] = matmul_peak(device, torch.bfloat16, n=args.mm_size)
        except Exception:  # noqa: BLE001
            pass
    else:
        mm = matmul_peak(device, n=args.mm_size)
        peak = {"source": "measured fp32 torch.mm (best of 5)", "gflops": mm["best_gflops"],
                "measured_fp32_mm": mm}
    peak_samples = [peak["gflops"]] if device == "cpu" else None
    log(f"# peak for %peak/MFU: {peak['gflops']:.1f} GFLOP/s ({peak['source']}"
        + ("; re-sampled every round, the best sample is used" if device == "cpu" else "") + ")")
    meta["peak"] = peak
    meta["args"] = {k: v for k, v in vars(args).items() if k != "amp_dtype_t"}
    meta["memory"] = MEMORY_NOTE[device]

    results, profiles = [], {}
    for name in chosen:
        workload = available[name]
        if args.batch:
            workload.batch = args.batch
        try:
            flops = count_flops(workload.teacher(), workload, device)
        except Exception as error:  # noqa: BLE001
            log(f"  FLOP count failed for {name}: {error}")
            flops = None
        meta.setdefault("flops_fwd_input_bwd", {})[name] = flops
        log(f"## {name}: batch {workload.batch}, image {workload.image_shape}, fwd+input-grad "
            f"bwd {(flops or 0) / 1e9:.2f} GFLOP/iteration")
        start = time.perf_counter()
        rows = bench_workload(workload, config_list, device, args, flops, log, profiles,
                              peak_samples)
        results += rows
        log(f"   ({time.perf_counter() - start:.0f} s)")

    if device == "cpu":
        meta["peak"]["measured_fp32_mm_end"] = matmul_peak(device, n=args.mm_size)
        peak_samples.append(meta["peak"]["measured_fp32_mm_end"]["best_gflops"])
        peak["gflops"] = max(peak_samples)
        peak["samples_gflops"] = [round(v, 2) for v in peak_samples]
        peak["source"] = (f"measured fp32 torch.mm {peak['measured_fp32_mm']['n']}^2, best of "
                          f"{len(peak_samples)} samples taken through the run")
    for r in results:
        if r.gflops_achieved is not None:
            r.pct_of_peak = 100 * r.gflops_achieved / peak["gflops"]
    try:
        meta["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    log("")
    for name, flops in meta.get("flops_fwd_input_bwd", {}).items():
        if flops:
            log(f"floor for {name}: {flops / 1e9:.2f} GFLOP/iteration at {peak['gflops']:.1f} "
                f"GFLOP/s = {flops / (peak['gflops'] * 1e9) * 1e3:.1f} ms/it")
    log(table(results, device))
    log("")
    log(f"ms/it: median steady-state seconds per iteration; x eager: eager ms/it / this ms/it, "
        f"same process; GFLOP/s: conv/linear FLOPs of forward + input-gradient backward per "
        f"second; {'MFU' if device == 'cuda' else '%peak'}: of {peak['gflops']:.0f} GFLOP/s; "
        f"mem: {MEMORY_NOTE[device]}; ops/it: aten ops per eager iteration, views excluded (on "
        f"a GPU, kernel launches); warmup s: first iteration of the first call (compile "
        f"included); 1st-it s: first iteration of later calls; dloss@1: relative difference of "
        f"the iteration-1 loss from eager's (same images and views).")
    for r in results:
        tolerance = 2e-2 if "amp_dtype" in r.options else 1e-4
        if r.loss_rel_diff is not None and r.loss_rel_diff > tolerance:
            log(f"WARNING: {r.workload}/{r.config}: iteration-1 loss differs from eager's by "
                f"{r.loss_rel_diff:.2e} (relative) for the same images and views: the "
                "configurations do not compute the same objective")
    stem = args.name or f"throughput-{device}" + ("-quick" if args.quick else "")
    paths = write_outputs(Path(args.out), stem, results, meta)
    if profiles:
        paths["profile"] = Path(args.out) / f"{stem}-profile.txt"
        paths["profile"].write_text("\n\n".join(f"=== {w} / {c}\n{t}"
                                                 for (w, c), t in profiles.items()))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results, paths


if __name__ == "__main__":
    main()
