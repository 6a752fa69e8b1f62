"""DeepInversion / Adaptive DeepInversion image synthesis (Yin et al., CVPR 2020).

`Inverter(teacher, image_shape=(C, H, W), ...)` and `inv.invert(targets)` is the API; the
reference's `DeepInversionClass(**kwargs).generate_batch(...)` works unchanged on `Inverter`
(the keyword translation is `dinv.compat`; the differences are listed in docs/reference.md).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import compat, ops
from .augment import JITTER_MODES, JitterFlip, apply_view, view_indices
from .distributed import check_shares, global_batch, ranks_for
from .hooks import BNStatistics
from .imaging import IMAGENET_MEAN, IMAGENET_STD, pixel_bounds
from .model_utils import describe_output, frozen, model_device, model_dtype
from .objective import Objective

# setting_id -> (stages of (downsampling factor, iterations), Adam betas, clip to pixel range)
SETTINGS = {
    0: (((2, 2000), (1, 1000)), (0.5, 0.9), True),   # multi-resolution, ResNet-50 ImageNet
    1: (((1, 2000),), (0.5, 0.9), True),
    2: (((1, 20000),), (0.9, 0.999), False),         # closest to the paper's experiments
}
WARMUP_ITERATIONS = 100
FUSED_ADAM_DEVICES = ("cpu", "cuda")
COMPETITIONS = ("reference", "js")
# The modern API's competition term (the reference API always uses "reference"): on digits the
# true Jensen-Shannon term taught better students at equal image budgets (README's ADI table).
DEFAULT_COMPETITION = "js"
TEACHER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
AMP_DTYPES = (torch.float16, torch.bfloat16)


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

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")


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


def _count(value, what: str) -> int:
    """An iteration count: any integer type (Python, numpy, 0-d integer tensor), not bool/float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            return int(value)
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def stages_for(setting_id: int, iterations=None):
    """[(downsampling factor, iterations)] for a setting; `iterations` overrides the counts: an int
    is the total (setting 0 splits it 2:1 between half and full resolution), a sequence gives
    each stage's count."""
    stages = SETTINGS[setting_id][0]
    if iterations is None:
        return list(stages)
    if not isinstance(iterations, (list, tuple)) and getattr(iterations, "ndim", 0) != 1:
        total = _count(iterations, "iterations")
        if total < 1:
            raise ValueError(f"iterations must be >= 1, got {total}")
        if len(stages) == 1:
            return [(stages[0][0], total)]
        low = (2 * total) // 3
        return [(2, low), (1, total - low)] if low else [(1, total)]
    counts = [_count(n, "each stage's iteration count") for n in iterations]
    if len(counts) != len(stages) or min(counts) < 0:
        raise ValueError(f"setting {setting_id} has {len(stages)} stage(s): give one count >= 0 "
                         f"per stage, got iterations {counts}")
    if sum(counts) == 0:
        raise ValueError(f"iterations {counts}: nothing to optimize (every stage has 0)")
    return [(factor, n) for (factor, _), n in zip(stages, counts) if n > 0]


def _is_default(value, default) -> bool:
    if value is default:
        return True
    plain = (int, float, str, tuple, type(None))
    return isinstance(value, plain) and isinstance(default, plain) and value == default


class Inverter:
    """Synthesizes images that a frozen teacher classifies as given targets, by matching every
    BatchNorm layer's running statistics (DeepInversion), optionally where a student disagrees
    with the teacher (Adaptive DeepInversion, `adi_scale > 0`).

    Images live in the teacher's normalized input space (`mean`/`std` are the normalization the
    teacher was trained with; pixel range [0, 1]). Use `dinv.imaging.denormalize`/`to_pil`.

    Loss weights (the reference's names): r_feature (BN statistics; the first BN layer's loss
    times first_bn_multiplier), tv_l1, tv_l2, l2, main_loss_multiplier (cross-entropy), adi_scale
    (ADI's competition term); lr: Adam's base learning rate (warm-up, then cosine to 0).
    competition: ADI's term, "js" (1 − the Jensen-Shannon divergence of the two softmaxes at
        adi_temperature) or "reference" (the NVlabs code's clamped formula; see
        `dinv.ops.js_competition`).
    setting_id: the reference's optimization settings (0: half then full resolution, 1: full
        resolution, 2: 20k iterations with other Adam betas and no clipping).
    jitter: random shift of up to this many pixels per iteration; jitter_mode "roll" (circular,
        the reference's) or "shift" (the uncovered border is the background, pixel 0); flip:
        random horizontal flips; clip: keep pixels in [0, 1] (default: the setting's).
    criterion(logits, targets): the main loss (default cross-entropy); output_function(output):
        the logits of a model's output (applied to the teacher and the student).
    amp_dtype: torch.bfloat16 / torch.float16 autocast (statistics stay fp32).
    fused_bn / channels_last / compile: speed options (see README "Benchmarks").
    log_every: iterations between the loss log, callbacks and NaN checks.
    distributed: False, or True (the default process group) / a ProcessGroup: one global batch
        over the group's ranks (see `dinv.distributed`). Every rank passes the same targets (and
        seed) to `invert`, optimizes its contiguous share of the batch and gets the whole batch
        back; the loss, every term and the image gradients are those of one process holding the
        whole batch. Not with `compile`.
    sync_stats: with `distributed`, the BatchNorm statistics are the whole batch's (True) or
        each rank's own share's (False: the reference's multi-GPU behaviour, for comparison).
    batch_shares: with `distributed`, relative shares of the batch per rank (default equal),
        e.g. for GPUs of unequal speed.

    A float64 teacher is inverted in float64 (float64 images); an fp16/bf16 teacher gets fp32
    images cast to its dtype for each forward.

    Also accepts the keyword arguments of the reference `DeepInversionClass` (`bs`, `use_fp16`,
    `net_teacher`, `path`, `final_data_path`, `parameters`, `setting_id`, `jitter`, `criterion`,
    `coefficients`, `network_output_function`, `hook_for_display`) and its `generate_batch`.
    Modern keywords may be mixed in: they apply unless a reference argument given too decides
    the same thing (then a TypeError says which two conflict).
    """

    def __init__(self, teacher: nn.Module | None = None, image_shape=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, *, r_feature: float = 0.05, first_bn_multiplier: float = 10.0,
                 tv_l1: float = 0.0, tv_l2: float = 1e-4, l2: float = 1e-5, lr: float = 0.25,
                 main_loss_multiplier: float = 1.0, adi_scale: float = 0.0,
                 competition: str = DEFAULT_COMPETITION, setting_id: int = 0, jitter: int = 30,
                 jitter_mode: str = "roll", flip: bool = True, clip: bool | None = None,
                 detach_student: bool = False, adi_temperature: float = 3.0, criterion=None,
                 output_function=None, amp_dtype: torch.dtype | None = None,
                 fused_bn: bool | None = None, channels_last: bool = False,
                 compile: bool | str = False, log_every: int = 100, distributed=False,
                 sync_stats: bool = True, batch_shares=None, **reference_kwargs):
        arguments = {name: value for name, value in locals().items() if name in _OPTIONS}
        self.reference = None
        if reference_kwargs:
            arguments = self._merge_reference(arguments, reference_kwargs)
        self._configure(**arguments)

    def _merge_reference(self, arguments: dict, reference_kwargs: dict) -> dict:
        translated, decided, self.reference = compat.reference_arguments(reference_kwargs)
        merged = dict(arguments)
        for name, value in translated.items():
            current = arguments[name]
            if _is_default(current, _OPTIONS[name]):
                merged[name] = value
            elif name in decided and current is not value and current != value:
                sources = [key for key, names in compat.DECIDES.items() if name in names]
                raise TypeError(f"{name}={_short(current)} conflicts with the reference argument "
                                f"{' / '.join(k for k in sources if k in reference_kwargs)}, "
                                f"which sets it to {_short(value)}: give one of them")
        return merged

    def _configure(self, teacher, image_shape, mean, std, *, r_feature, first_bn_multiplier,
                   tv_l1, tv_l2, l2, lr, main_loss_multiplier, adi_scale, competition,
                   setting_id, jitter, jitter_mode, flip, clip, detach_student, adi_temperature,
                   criterion, output_function, amp_dtype, fused_bn, channels_last, compile,
                   log_every, distributed, sync_stats, batch_shares):
        if teacher is None:
            raise TypeError("Inverter needs a teacher model")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if image_shape is None or len(image_shape) != 3 or any(
                isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
                for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive integers, got "
                             f"{image_shape}")
        self.teacher = teacher
        self.image_shape = tuple(int(s) for s in image_shape)
        channels = self.image_shape[0]
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {mean}, {std}")
        if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0
                                                              for v in std):
            raise ValueError(f"mean must be finite and std > 0 and finite, got {mean}, {std}")
        self.mean, self.std = mean, std
        self.coefficients = Coefficients(r_feature, first_bn_multiplier, tv_l1, tv_l2, l2, lr,
                                         main_loss_multiplier, adi_scale)
        self.coefficients.check()
        if competition not in COMPETITIONS:
            raise ValueError(f"competition must be one of {COMPETITIONS}, got {competition!r}")
        if setting_id not in SETTINGS or isinstance(setting_id, bool):
            raise ValueError(f"setting_id must be one of {sorted(SETTINGS)}, got {setting_id!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, numbers.Integral) or jitter < 0:
            raise ValueError(f"jitter must be an integer >= 0, got {jitter!r}")
        if jitter_mode not in JITTER_MODES:
            raise ValueError(f"jitter_mode must be one of {JITTER_MODES}, got {jitter_mode!r}")
        if not (isinstance(adi_temperature, numbers.Real) and math.isfinite(adi_temperature)
                and adi_temperature > 0):
            raise ValueError(f"adi_temperature must be a finite number > 0, got "
                             f"{adi_temperature!r}")
        if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got "
                             f"{amp_dtype!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral) \
                or log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.teacher_dtype = model_dtype(teacher)
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise TypeError(f"the teacher's parameters are {self.teacher_dtype}; dinv inverts "
                            f"float32, float64, float16 and bfloat16 teachers")
        if amp_dtype is not None and self.teacher_dtype == torch.float64:
            raise ValueError("amp_dtype with a float64 teacher: autocast would lower its "
                             "precision; invert a float64 teacher without amp_dtype")
        # The optimized images (and every loss) are float64 for a float64 teacher, else float32.
        self.dtype = torch.float64 if self.teacher_dtype == torch.float64 else torch.float32
        self.competition = competition
        self.setting_id = int(setting_id)
        self.jitter = int(jitter)
        self.jitter_mode = jitter_mode
        self.flip = bool(flip)
        self.clip = SETTINGS[self.setting_id][2] if clip is None else bool(clip)
        self.detach_student = bool(detach_student)
        self.adi_temperature = float(adi_temperature)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.output_function = output_function
        self.amp_dtype = amp_dtype
        self.log_every = int(log_every)
        self.device = model_device(teacher)
        # Fused BN only pays when a native kernel runs it; the reference would compute the same.
        self.fused_bn = (ops.select("bn_stats_forward", torch.empty(0, device=self.device))
                         != "reference" if fused_bn is None else bool(fused_bn))
        self.statistics = BNStatistics(teacher, fused=self.fused_bn)
        self.channels_last = bool(channels_last)
        # compile: False, True (torch.compile's default mode) or a mode name such as
        # "max-autotune-no-cudagraphs" / "reduce-overhead" (CUDA graphs).
        self.compile_mode = compile
        self._compiled = {}
        self.objective = Objective(self.coefficients, self.criterion, self.competition,
                                   self.adi_temperature, self.detach_student, self.dtype)
        self._configure_distributed(distributed, sync_stats, batch_shares)
        self.log = LossLog()
        self._closed = False

    def _configure_distributed(self, distributed, sync_stats, batch_shares) -> None:
        if not isinstance(sync_stats, bool):
            raise TypeError(f"sync_stats must be True or False, got {sync_stats!r}")
        # Ranks of the global batch (None: one process); validated here, not at invert time.
        self.ranks = ranks_for(distributed)
        if self.ranks is None and (not sync_stats or batch_shares is not None):
            raise ValueError("sync_stats and batch_shares apply to a global batch: pass "
                             "distributed=True (or a process group) too")
        if self.ranks is not None and self.compile_mode:
            raise ValueError("compile with distributed: the collectives of a global batch are "
                             "not traced; use compile=False")
        self.sync_stats = sync_stats
        self.batch_shares = None if batch_shares is None else \
            check_shares(batch_shares, self.ranks.size)

    def settings(self) -> dict:
        """Everything that decides the images besides the teacher's weights, the targets and
        the seeds, as JSON-able values (what a dataset manifest records)."""
        return {"image_shape": list(self.image_shape), "mean": list(self.mean),
                "std": list(self.std), **asdict(self.coefficients),
                "competition": self.competition, "setting_id": self.setting_id,
                "jitter": self.jitter, "jitter_mode": self.jitter_mode, "flip": self.flip,
                "clip": self.clip, "detach_student": self.detach_student,
                "adi_temperature": self.adi_temperature,
                "criterion": _describe_callable(self.criterion),
                "output_function": _describe_callable(self.output_function),
                "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype),
                "teacher_dtype": str(self.teacher_dtype), "fused_bn": self.fused_bn,
                "channels_last": self.channels_last, "compile": self.compile_mode,
                **self._distributed_settings()}

    def _distributed_settings(self) -> dict:
        # Absent for one process, so that the manifests of single-process runs stay as they were.
        if self.ranks is None:
            return {}
        return {"global_batch": {"ranks": self.ranks.size, "sync_stats": self.sync_stats,
                                 "batch_shares": self.batch_shares}}

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
        dtype = model_dtype(model)
        out = model(x if dtype == x.dtype or not dtype.is_floating_point else x.to(dtype))
        return self.output_function(out) if self.output_function is not None else out

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def bn_losses(self, images: torch.Tensor) -> torch.Tensor:
        """[L] per-BatchNorm-layer statistic losses of a batch (no jitter, no gradient)."""
        with torch.no_grad(), frozen(self.teacher), self.statistics, self._autocast():
            self._logits(self.teacher, images.to(self.device, self.dtype))
            return self.statistics.layer_losses()

    def _check_targets(self, targets) -> torch.Tensor:
        if targets is None:
            raise TypeError("targets is None: give one class index per image to synthesize")
        if isinstance(targets, torch.Tensor):
            tensor = targets.detach()
        else:
            try:
                tensor = torch.as_tensor(targets)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(f"targets must be class indices (a list, array or tensor of "
                                f"integers), got {type(targets).__name__}: {error}") from error
        if tensor.numel() == 0:
            raise ValueError("targets is empty: give one class index per image to synthesize")
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"targets must be integer class indices, got dtype {tensor.dtype}")
        if tensor.dim() > 1:
            raise ValueError(f"targets must be one class index per image (1-D), got shape "
                             f"{tuple(tensor.shape)}")
        tensor = tensor.reshape(-1).to(self.device, torch.long)
        if tensor.min() < 0:
            raise ValueError(f"targets must be class indices >= 0, got {tensor.min().item()}")
        return tensor

    # -- the optimization ----------------------------------------------------------------------
    def invert(self, targets, iterations=None, student: nn.Module | None = None,
               seed: int | None = None, init: torch.Tensor | None = None, callback=None,
               progress: bool = False, augment_seed: int | None = None) -> torch.Tensor:
        """Synthesizes one image per entry of `targets` and returns them, [len(targets), C, H, W]
        in the normalized input space: for each image, the iterate with the lowest cost (its own
        weighted cross-entropy plus the batch's regularizers) in the last stage.

        iterations: None (the setting's), an int total, or one count per stage.
        student: enables the ADI competition term (needs adi_scale > 0).
        seed: the start noise and the jitter/flip draws (same seed, device and backend -> same
            images). None: drawn from torch's global generator, which is never re-seeded (a
            `torch.manual_seed` before the call makes it reproducible).
        augment_seed: the jitter/flip draws alone (default: derived from `seed`), e.g. to give
            two implementations the same augmented views.
        init: starting images (default: standard normal noise).
        callback(iteration, images, terms): called every `log_every` iterations.
        progress: a progress bar over the iterations.

        With `distributed`, `targets`, `seed` and `init` are the whole batch's (the same on every
        rank), the result is the whole batch, and `callback` gets this rank's share of it with
        the whole batch's terms; the bar is rank 0's.
        """
        if self._closed:
            raise RuntimeError("this Inverter was closed")
        targets = self._check_targets(targets)
        stages = stages_for(self.setting_id, iterations)
        c = self.coefficients
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if c.adi_scale and student is None:
            raise ValueError("adi_scale > 0 needs a student (invert(..., student=model))")
        for factor in sorted({factor for factor, _ in stages}):
            self._probe(targets, student if c.adi_scale else None, factor)
        batch = None
        if self.ranks is not None:
            batch, seed = global_batch(self.ranks, targets, seed, self.batch_shares)
        shape = (targets.numel(),) + self.image_shape
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_count(seed, "seed"))
        if init is not None:
            if not isinstance(init, torch.Tensor) or tuple(init.shape) != shape:
                raise ValueError(f"init must be a tensor of shape {shape}, got "
                                 f"{tuple(init.shape) if isinstance(init, torch.Tensor) else init}")
            images = init.detach().to(self.device, self.dtype).clone()
        else:
            images = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        if augment_seed is None:
            augment_seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                             device=self.device).item())
        if batch is not None:
            # The start noise and the jitter/flip draws are the whole batch's, as in one process.
            images, targets = batch.local(images).clone(), batch.local(targets)
            shape = tuple(images.shape)
        images.requires_grad_(True)
        lo, hi = (b.to(self.dtype) for b in pixel_bounds(self.mean, self.std, self.device))
        total = sum(n for _, n in stages)
        betas = SETTINGS[self.setting_id][1]
        bar = _progress(total, progress and (self.ranks is None or self.ranks.first))
        scaler = torch.amp.GradScaler(self.device.type,
                                      enabled=self.amp_dtype == torch.float16)
        jitter = JitterFlip(0, self.flip, augment_seed)
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
                    best_cost = torch.full((shape[0],), math.inf, device=self.device,
                                           dtype=self.dtype)
                    for local in range(n_iter):
                        iteration += 1
                        for group in optimizer.param_groups:
                            group["lr"] = cosine_lr(c.lr, local, n_iter)
                        dy, dx, flip = jitter.draw()
                        view = view_indices(shape[2] // factor, shape[3] // factor, dy, dx, flip,
                                            self.jitter_mode, self.device)
                        loss, per_image, terms = self._loss_fn(factor, batch)(images, view, lo,
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
                            diverged = int(first_bad.item()) if batch is None else \
                                batch.first_nonzero(first_bad)
                            if diverged:
                                raise InversionDiverged(diverged, best.clone() if batch is None
                                                        else batch.gather(best))
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
        return best if batch is None else batch.gather(best)

    def _probe(self, targets, student, factor: int) -> None:
        """One forward of blank images at a stage's resolution before optimizing, to fail early
        and clearly on an image shape the teacher cannot take or targets beyond its outputs."""
        c, h, w = self.image_shape
        size = (c, h // factor, w // factor)
        if min(size[1:]) < 1:
            raise ValueError(f"setting {self.setting_id} optimizes at 1/{factor} resolution first, "
                             f"and images of {self.image_shape} are too small for it: use "
                             "setting_id=1 or iterations=[0, n] (full resolution only)")
        stage = "" if factor == 1 else (f" (setting {self.setting_id}'s first stage runs at 1/"
                                        f"{factor} resolution)")
        x = torch.zeros((2,) + size, device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad(), frozen(self.teacher, student), self._autocast():
                logits = self._logits(self.teacher, x)
                student_logits = None if student is None else self._logits(student, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ValueError(f"the teacher (or student) cannot take images of shape {size}"
                             f"{stage}: {str(error).splitlines()[0]}") from error
        for name, out in (("teacher", logits), ("student", student_logits)):
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError(f"the {name} returned {describe_output(out)}; expected class "
                                 "logits [N, classes]: pass output_function to extract them "
                                 "(e.g. output_function=lambda out: out[0])")
        if student_logits is not None and student_logits.shape != logits.shape:
            raise ValueError(f"the student predicts {student_logits.shape[1]} classes and the "
                             f"teacher {logits.shape[1]}: ADI compares them class by class")
        if targets.max() >= logits.shape[1]:
            raise ValueError(f"targets go up to {targets.max().item()} but the teacher has "
                             f"{logits.shape[1]} outputs")

    def _loss_fn(self, factor: int, batch=None):
        if not self.compile_mode:
            return functools.partial(self._loss, factor=factor, batch=batch)
        if factor not in self._compiled:
            mode = None if self.compile_mode is True else self.compile_mode
            self._compiled[factor] = torch.compile(functools.partial(self._loss, factor=factor),
                                                   mode=mode)
        return self._compiled[factor]

    def _loss(self, images, view, background, targets, student, factor, batch=None):
        """The DeepInversion objective of one jittered view; returns (loss, per-image cost for
        keeping the best images, detached terms for logging). `batch`: the GlobalBatch that
        `images` are this rank's share of."""
        x = F.avg_pool2d(images, factor) if factor > 1 else images
        x = apply_view(x, view, background)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self._logits(self.teacher, x)
            layer_losses = self.statistics.layer_losses(
                batch.merge if batch is not None and self.sync_stats else None)
            student_logits = self._logits(student, x) if self.coefficients.adi_scale else None
        return self.objective(x, logits, layer_losses, targets, student_logits, batch)

    # -- the reference's API ------------------------------------------------------------------
    def generate_batch(self, net_student=None, targets=None, seed: int | None = None):
        """The reference `DeepInversionClass.generate_batch`: synthesizes a batch (default
        targets: the reference's), writes its files like the reference, and (unlike it) also
        returns the images. `seed` (a dinv addition) defaults to the generation's index, so a
        script's run is reproducible as the reference's is."""
        output = self.reference
        if output is None:
            raise TypeError("generate_batch is the reference API: build the Inverter with the "
                            "reference's keyword arguments (bs=..., net_teacher=..., ...), or "
                            "call invert(targets)")
        targets = output.default_targets() if targets is None else self._check_targets(targets)
        targets = targets.to(self.device)
        images = self.invert(targets, iterations=output.iterations, student=net_student,
                             seed=output.num_generations if seed is None else seed,
                             callback=output.progress_callback(targets, self.mean, self.std))
        # A global batch comes back whole on every rank: one of them writes it.
        if output.store_best_images and (self.ranks is None or self.ranks.first):
            output.store(images, targets, self.mean, self.std)
        output.num_generations += 1
        return images


_OPTIONS = {name: parameter.default
            for name, parameter in inspect.signature(Inverter.__init__).parameters.items()
            if name not in ("self", "reference_kwargs")}


def _short(value) -> str:
    """A one-line description of an argument's value for error messages."""
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__}>"
    if callable(value):
        return f"<{getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(value)


def _describe_callable(fn) -> str | None:
    if fn is None:
        return None
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", type(fn).__name__)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="inverting", unit="it", dynamic_ncols=True)
