"""DeepInversion / Adaptive DeepInversion image synthesis (Yin et al., CVPR 2020).

`Inverter(teacher, image_shape=(C, H, W), ...)` and `inv.invert(targets)` is the API; the
reference's `DeepInversionClass(**kwargs).generate_batch(...)` works unchanged on `Inverter`
(see `dinv.compat`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .augment import JitterFlip, gather_hw, jitter_flip_indices
from .hooks import BNStatistics
from .imaging import IMAGENET_MEAN, IMAGENET_STD, pixel_bounds

# setting_id -> (stages of (downsampling factor, iterations), Adam betas, clip to pixel range)
SETTINGS = {
    0: (((2, 2000), (1, 1000)), (0.5, 0.9), True),   # multi-resolution, ResNet-50 ImageNet
    1: (((1, 2000),), (0.5, 0.9), True),
    2: (((1, 20000),), (0.9, 0.999), False),         # closest to the paper's experiments
}
WARMUP_ITERATIONS = 100
FUSED_ADAM_DEVICES = ("cpu", "cuda")


class InversionDiverged(FloatingPointError):
    """The loss became NaN/Inf. `.iteration` is where (1-based, counted over all stages);
    `.images` the best finite images found before it."""

    def __init__(self, iteration: int, images: torch.Tensor):
        super().__init__(f"the inversion loss became NaN/Inf at iteration {iteration}; lower the "
                         "learning rate or the loss coefficients. The best images before it are "
                         "in this exception's .images")
        self.iteration = iteration
        self.images = images


@dataclass
class Coefficients:
    """Loss weights, named as in the reference's `coefficients` dict."""
    r_feature: float = 0.05
    first_bn_multiplier: float = 10.0
    tv_l1: float = 0.0
    tv_l2: float = 1e-4
    l2: float = 1e-5
    lr: float = 0.25
    main_loss_multiplier: float = 1.0
    adi_scale: float = 0.0


@dataclass
class LossLog:
    """Loss terms of logged iterations (python floats), filled every `log_every` iterations."""
    iterations: list = field(default_factory=list)
    terms: dict = field(default_factory=dict)

    def add(self, iteration: int, terms: dict) -> None:
        self.iterations.append(iteration)
        for name, value in terms.items():
            self.terms.setdefault(name, []).append(value)


def cosine_lr(base_lr: float, iteration: int, total: int) -> float:
    """The reference's schedule: linear warm-up for 100 iterations, then cosine to 0. Runs shorter
    than 200 iterations warm up for half their length so they still reach the base rate."""
    warmup = min(WARMUP_ITERATIONS, max(total // 2, 1))
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(total - warmup, 1))) * base_lr


def stages_for(setting_id: int, iterations=None):
    """[(downsampling factor, iterations)] for a setting; `iterations` overrides the counts: an int
    is the total (setting 0 splits it 2:1 between half and full resolution), a sequence gives
    each stage's count."""
    stages = SETTINGS[setting_id][0]
    if iterations is None:
        return list(stages)
    if isinstance(iterations, int):
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if len(stages) == 1:
            return [(stages[0][0], iterations)]
        low = (2 * iterations) // 3
        return [(2, low), (1, iterations - low)] if low else [(1, iterations)]
    iterations = list(iterations)
    if len(iterations) != len(stages) or min(iterations) < 0:
        raise ValueError(f"setting {setting_id} has {len(stages)} stage(s); got iterations "
                         f"{iterations}")
    return [(factor, n) for (factor, _), n in zip(stages, iterations) if n > 0]


@contextlib.contextmanager
def frozen(*models):
    """Eval mode and no parameter gradients inside; each model's mode and requires_grad flags
    are restored exactly afterwards."""
    saved = []
    for model in models:
        if model is None:
            continue
        saved.append(([(m, m.training) for m in model.modules()],
                      [(p, p.requires_grad) for p in model.parameters()]))
        model.eval()
        model.requires_grad_(False)
    try:
        yield
    finally:
        for modes, flags in saved:
            for m, training in modes:
                m.training = training
            for p, flag in flags:
                p.requires_grad_(flag)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class Inverter:
    """Synthesizes images that a frozen teacher classifies as given targets, by matching every
    BatchNorm layer's running statistics (DeepInversion), optionally where a student disagrees
    with the teacher (Adaptive DeepInversion, `adi_scale > 0`).

    Images live in the teacher's normalized input space (`mean`/`std` are the normalization the
    teacher was trained with; pixel range [0, 1]). Use `dinv.imaging.denormalize`/`to_pil`.

    Also accepts the keyword arguments of the reference `DeepInversionClass` (`bs`, `use_fp16`,
    `net_teacher`, `path`, `final_data_path`, `parameters`, `setting_id`, `jitter`, `criterion`,
    `coefficients`, `network_output_function`, `hook_for_display`) and its `generate_batch`.
    """

    def __init__(self, teacher: nn.Module | None = None, image_shape=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, *, r_feature: float = 0.05, first_bn_multiplier: float = 10.0,
                 tv_l1: float = 0.0, tv_l2: float = 1e-4, l2: float = 1e-5, lr: float = 0.25,
                 main_loss_multiplier: float = 1.0, adi_scale: float = 0.0,
                 setting_id: int = 0, jitter: int = 30, flip: bool = True, clip: bool | None = None,
                 detach_student: bool = False, adi_temperature: float = 3.0,
                 criterion=None, output_function=None, amp_dtype: torch.dtype | None = None,
                 fused_bn: bool | None = None, channels_last: bool = False,
                 compile: bool | str = False, log_every: int = 100, **reference_kwargs):
        from . import compat

        if reference_kwargs:
            compat.init_reference(self, teacher=teacher, setting_id=setting_id, jitter=jitter,
                                  criterion=criterion, **reference_kwargs)
            return
        if teacher is None:
            raise TypeError("Inverter needs a teacher model")
        if image_shape is None or len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if setting_id not in SETTINGS:
            raise ValueError(f"setting_id must be one of {sorted(SETTINGS)}, got {setting_id}")
        self.teacher = teacher
        self.image_shape = tuple(int(s) for s in image_shape)
        channels = self.image_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {mean}, {std}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.coefficients = Coefficients(r_feature, first_bn_multiplier, tv_l1, tv_l2, l2, lr,
                                         main_loss_multiplier, adi_scale)
        self.setting_id = setting_id
        self.jitter = int(jitter)
        self.flip = flip
        self.clip = SETTINGS[setting_id][2] if clip is None else clip
        self.detach_student = detach_student
        self.adi_temperature = adi_temperature
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.output_function = output_function
        self.amp_dtype = amp_dtype
        self.log_every = log_every
        self.device = model_device(teacher)
        # Fused BN only pays when a native kernel runs it; the reference would compute the same.
        self.fused_bn = (ops.select(torch.empty(0, device=self.device)) != "reference"
                         if fused_bn is None else fused_bn)
        self.statistics = BNStatistics(teacher, fused=self.fused_bn)
        self.channels_last = channels_last
        # compile: False, True (torch.compile's default mode) or a mode name such as
        # "max-autotune-no-cudagraphs" / "reduce-overhead" (CUDA graphs).
        self.compile_mode = compile
        self._compiled = {}
        self.log = LossLog()
        self._closed = False

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Removes anything installed on the teacher. Hooks only live during `invert`, so this
        is a safety net for interrupted runs; the teacher is otherwise untouched."""
        self.statistics.remove()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        statistics = getattr(self, "statistics", None)
        if statistics is not None:
            statistics.remove()

    # -- the pieces of one iteration ------------------------------------------------------------
    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return self.output_function(out) if self.output_function is not None else out

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def bn_losses(self, images: torch.Tensor) -> torch.Tensor:
        """[L] per-BatchNorm-layer statistic losses of a batch (no jitter, no gradient)."""
        with torch.no_grad(), frozen(self.teacher), self.statistics, self._autocast():
            self._logits(self.teacher, images.to(self.device))
            return self.statistics.layer_losses()

    def _check_targets(self, targets) -> torch.Tensor:
        targets = torch.as_tensor(targets).to(self.device).long().flatten()
        if targets.numel() == 0:
            raise ValueError("targets is empty: give one class index per image to synthesize")
        if targets.min() < 0:
            raise ValueError(f"targets must be class indices >= 0, got {targets.min().item()}")
        return targets

    # -- the optimization ----------------------------------------------------------------------
    def invert(self, targets, iterations=None, student: nn.Module | None = None,
               seed: int | None = None, init: torch.Tensor | None = None, callback=None,
               progress: bool = False) -> torch.Tensor:
        """Synthesizes one image per entry of `targets` and returns them, [len(targets), C, H, W]
        in the normalized input space: for each image, the iterate with the lowest cost (its own
        weighted cross-entropy plus the batch's regularizers) in the last stage.

        iterations: None (the setting's), an int total, or one count per stage.
        student: enables the ADI competition term (needs adi_scale > 0).
        seed: same seed, device and backend -> same images.
        init: starting images (default: standard normal noise).
        callback(iteration, images, terms): called every `log_every` iterations.
        """
        if self._closed:
            raise RuntimeError("this Inverter was closed")
        targets = self._check_targets(targets)
        c = self.coefficients
        self._probe(targets, student)
        if c.adi_scale and student is None:
            raise ValueError("adi_scale > 0 needs a student (invert(..., student=model))")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        shape = (targets.numel(),) + self.image_shape
        if init is not None:
            if tuple(init.shape) != shape:
                raise ValueError(f"init must have shape {shape}, got {tuple(init.shape)}")
            images = init.detach().to(self.device, torch.float32).clone()
        else:
            images = torch.randn(shape, generator=generator, device=self.device)
        images.requires_grad_(True)
        augment_rng_seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                             device=self.device).item())
        lo, hi = pixel_bounds(self.mean, self.std, self.device)
        stages = stages_for(self.setting_id, iterations)
        total = sum(n for _, n in stages)
        betas = SETTINGS[self.setting_id][1]
        bar = _progress(total, progress)
        scaler = torch.amp.GradScaler(self.device.type,
                                      enabled=self.amp_dtype == torch.float16)
        jitter = JitterFlip(0, self.flip, augment_rng_seed)
        iteration = 0
        first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        best = images.detach().clone()
        try:
            with frozen(self.teacher, student), self.statistics:
                for factor, n_iter in stages:
                    # fused: one kernel per step, and no per-step host sync (the unfused Adam
                    # reads its step count with .item(); GradScaler skips its inf check .item()
                    # for fused optimizers, which take the scale and inf flag themselves).
                    optimizer = torch.optim.Adam([images], lr=c.lr, betas=betas, eps=1e-8,
                                                 fused=self.device.type in FUSED_ADAM_DEVICES)
                    jitter.limit = self.jitter // factor
                    best = images.detach().clone()
                    best_cost = torch.full((shape[0],), math.inf, device=self.device)
                    for local in range(n_iter):
                        iteration += 1
                        for group in optimizer.param_groups:
                            group["lr"] = cosine_lr(c.lr, local, n_iter)
                        dy, dx, flip = jitter.draw()
                        rows, cols = jitter_flip_indices(
                            shape[2] // factor, shape[3] // factor, dy, dx, flip, self.device)
                        loss, per_image, terms = self._loss_fn(factor)(images, rows, cols,
                                                                       targets, student)
                        improved = per_image < best_cost
                        best_cost = torch.where(improved, per_image, best_cost)
                        best = torch.where(improved.view(-1, 1, 1, 1), images.detach(), best)
                        bad = ~torch.isfinite(loss)
                        first_bad = torch.where(bad & (first_bad == 0),
                                                torch.full_like(first_bad, iteration), first_bad)
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        if self.clip:
                            with torch.no_grad():
                                torch.maximum(torch.minimum(images, hi), lo, out=images)
                        if iteration % self.log_every == 0 or iteration == total:
                            if first_bad.item():
                                raise InversionDiverged(int(first_bad.item()), best.clone())
                            values = {k: float(v) for k, v in terms.items()}
                            self.log.add(iteration, values)
                            if bar is not None:
                                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
                            if callback is not None:
                                callback(iteration, images.detach(), values)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return best

    def _probe(self, targets, student) -> None:
        """One forward of noise before optimizing, to fail early and clearly on an image shape
        the teacher cannot take or targets beyond its outputs."""
        x = torch.zeros((2,) + self.image_shape, device=self.device)
        try:
            with torch.no_grad(), frozen(self.teacher, student):
                logits = self._logits(self.teacher, x)
                if student is not None:
                    self._logits(student, x)
        except RuntimeError as error:
            raise ValueError(f"the teacher (or student) cannot take images of shape "
                             f"{self.image_shape}: {error}") from error
        if logits.dim() != 2:
            raise ValueError(f"the teacher's output has shape {tuple(logits.shape)}; expected "
                             "class logits [N, classes] (use output_function to extract them)")
        if targets.max() >= logits.shape[1]:
            raise ValueError(f"targets go up to {targets.max().item()} but the teacher has "
                             f"{logits.shape[1]} outputs")

    def _loss_fn(self, factor: int):
        if not self.compile_mode:
            return functools.partial(self._loss, factor=factor)
        if factor not in self._compiled:
            mode = None if self.compile_mode is True else self.compile_mode
            compiled = torch.compile(functools.partial(self._loss, factor=factor), mode=mode)
            self._compiled[factor] = functools.partial(self._run_compiled, compiled)
        return self._compiled[factor]

    def _run_compiled(self, compiled, *args):
        # On CPU the compiled step traces the ops' torch formulations: Inductor fuses them with
        # the neighbouring BatchNorm/ReLU/pooling code, while the C++ kernels would stay opaque
        # calls between fused regions (digits net: 78 vs 113 ms/it, benchmarks/RESULTS.md). On
        # GPU the dispatcher's choice stands, and a backend the user forces always wins.
        if self.device.type != "cpu" or ops.forced() is not None:
            return compiled(*args)
        with ops.use_backend("reference"):
            return compiled(*args)

    def _loss(self, images, rows, cols, targets, student, factor):
        """The DeepInversion objective of one jittered view; returns (loss, per-image cost for
        keeping the best images, detached terms for logging)."""
        c = self.coefficients
        x = F.avg_pool2d(images, factor) if factor > 1 else images
        x = gather_hw(x, rows, cols)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self._logits(self.teacher, x)
            layer = self.statistics.layer_losses()
            student_logits = self._logits(student, x) if c.adi_scale else None
        logits = logits.float()
        main = self.criterion(logits, targets)
        weights = torch.ones_like(layer)
        weights[0] = c.first_bn_multiplier
        r_feature = (layer * weights).sum()
        prior = ops.image_prior(x)  # TV l1/l2 and L2 from one pass over x (fp32 sums)
        aux = c.r_feature * r_feature + c.l2 * prior.l2
        terms = {"main": main, "r_feature": r_feature}
        if c.tv_l2:
            aux = aux + c.tv_l2 * prior.tv_l2
            terms["tv_l2"] = prior.tv_l2
        if c.tv_l1:
            aux = aux + c.tv_l1 * prior.tv_l1
            terms["tv_l1"] = prior.tv_l1
        if c.adi_scale:
            competition = ops.js_competition(student_logits.float(), logits,
                                             T=self.adi_temperature,
                                             detach_student=self.detach_student)
            aux = aux + c.adi_scale * competition
            terms["competition"] = competition
        loss = c.main_loss_multiplier * main + aux
        terms["loss"] = loss
        with torch.no_grad():
            per_image = c.main_loss_multiplier * F.cross_entropy(logits, targets, reduction="none") \
                + aux.detach()
        return loss, per_image, {k: v.detach() for k, v in terms.items()}

    # -- the reference's API ------------------------------------------------------------------
    def generate_batch(self, net_student=None, targets=None):
        """The reference `DeepInversionClass.generate_batch`: synthesizes a batch, writes its
        files like the reference, and (unlike it) also returns the images."""
        from . import compat

        return compat.generate_batch(self, net_student, targets)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="inverting", unit="it", dynamic_ncols=True)
