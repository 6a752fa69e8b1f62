"""Data-free knowledge distillation: a student learns from a teacher on synthesized images only
(Yin et al., CVPR 2020, "data-free knowledge transfer").

    distill_offline   DeepInversion (DI): the images are synthesized once (`dinv invert`,
                      `dinv.data.synthesize_dataset`), then the student is distilled on that pool.
    distill_adaptive  Adaptive DeepInversion (ADI): new batches are synthesized while the student
                      trains, each against the current student (the competition term seeks images
                      the two disagree on), into a bounded pool the student keeps training on.

Both minimize Hinton's T²·KL (`dinv.ops.kd_loss`) between the student's logits and the frozen
teacher's on the same augmented batch, with SGD or Adam and a per-step cosine learning rate that
reaches zero at the last step. With a `checkpoint_dir` they checkpoint after every epoch
(atomically), write the metrics to metrics.csv and metrics.json there, and resume (`resume=True`)
to exactly the weights of an uninterrupted run (same device and backend; CPU runs are
deterministic).
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import ops
from .data import atomic_json, atomic_save, batch_seed, batch_targets, load_shards
from .inverter import model_device, frozen

CHECKPOINT = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
METRIC_FIELDS = ("epoch", "step", "images_seen", "images_synthesized", "pool_size", "train_loss",
                 "val_acc", "lr", "seconds")


@dataclass(frozen=True)
class KDOptions:
    """How the student is trained, in both modes (keyword arguments of the distill functions).

    batch_size: images per student step.
    lr: the initial learning rate; a per-step cosine takes it to zero at the end of the run.
    optimizer: "sgd" (Nesterov momentum 0.9) or "adam".
    weight_decay: L2 penalty on the student's weights.
    T: distillation temperature.
    augment: random translation (pad and crop) of each image by up to this many pixels; 0: none.
    flip: random horizontal flips. Off by default: mirroring is a prior about the domain, and a
        wrong one for digits or text.
    seed: batch order, augmentation and (ADI) synthesis seeds. The student's initialization is the
        caller's.
    """
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    T: float = 4.0
    augment: int = 2
    flip: bool = False
    seed: int = 0


def _make_optimizer(student: nn.Module, options: KDOptions) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=options.lr, momentum=0.9, nesterov=True,
                               weight_decay=options.weight_decay)
    if options.optimizer == "adam":
        return torch.optim.Adam(student.parameters(), lr=options.lr,
                                weight_decay=options.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {options.optimizer!r}")


def augment_batch(images: torch.Tensor, options: KDOptions, generator: torch.Generator):
    """The student's data augmentation: per-image random translation and optional flips."""
    from .models.digits import random_translate

    if options.augment:
        images = random_translate(images, options.augment, generator)
    if options.flip:
        flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    return images


class _Run:
    """What both modes share: the optimizer and schedule, the private RNG, one distillation step,
    evaluation, metrics, and the checkpoint (which holds all of them)."""

    def __init__(self, teacher, student, options: KDOptions, total_steps: int, config: dict,
                 checkpoint_dir, eval_data, on_epoch):
        if total_steps < 1:
            raise ValueError("nothing to train: need epochs >= 1 and at least one image")
        self.teacher, self.student, self.options = teacher, student, options
        self.device = model_device(student)
        self.optimizer = _make_optimizer(student, options)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
        # A private generator, so that the batches and augmentations do not depend on what else
        # the process draws from torch's global RNG.
        self.generator = torch.Generator().manual_seed(options.seed)
        self.config = {**config, **asdict(options)}
        self.checkpoint_dir = checkpoint_dir
        self.eval_data = None if eval_data is None else tuple(t.to(self.device) for t in eval_data)
        self.on_epoch = on_epoch
        self.epoch = self.step = self.images_seen = 0
        self.seconds = 0.0
        self.metrics = []
        self._loss_sum = torch.zeros((), device=self.device)
        self._epoch_steps = 0
        self._epoch_start = time.perf_counter()

    def train_step(self, images: torch.Tensor) -> None:
        x = augment_batch(images, self.options, self.generator)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = ops.kd_loss(self.student(x), teacher_logits, self.options.T)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        # Summed on the device: a .item() per step would synchronize a GPU every step.
        self._loss_sum += loss.detach()
        self._epoch_steps += 1
        self.step += 1
        self.images_seen += len(images)

    def end_epoch(self, images_synthesized: int, pool_size: int, extra_state=None) -> None:
        """Evaluates, records the epoch's metrics, checkpoints, then calls `on_epoch(row)`."""
        from .models import accuracy

        self.epoch += 1
        self.seconds += time.perf_counter() - self._epoch_start
        row = {"epoch": self.epoch, "step": self.step, "images_seen": self.images_seen,
               "images_synthesized": images_synthesized, "pool_size": pool_size,
               "train_loss": (self._loss_sum / max(self._epoch_steps, 1)).item(),
               "val_acc": None if self.eval_data is None else accuracy(self.student,
                                                                       *self.eval_data),
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(self.seconds, 3)}
        self.metrics.append(row)
        if self.checkpoint_dir is not None:
            self._save(extra_state or {})
        self._loss_sum.zero_()
        self._epoch_steps = 0
        if self.on_epoch is not None:
            self.on_epoch(row)
        self._epoch_start = time.perf_counter()

    def _save(self, extra_state: dict) -> None:
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        state = {"config": self.config, "epoch": self.epoch, "step": self.step,
                 "images_seen": self.images_seen, "seconds": self.seconds,
                 "metrics": self.metrics, "student": self.student.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                 **extra_state}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        atomic_save(state, os.path.join(self.checkpoint_dir, CHECKPOINT))
        write_metrics(self.metrics, self.checkpoint_dir)

    def restore(self, resume: bool) -> dict:
        """Loads the checkpoint of `checkpoint_dir` when resuming; returns it ({} if none)."""
        path = None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir,
                                                                      CHECKPOINT)
        if path is None or not os.path.exists(path):
            return {}
        if not resume:
            raise FileExistsError(f"{path} exists: resume it (resume=True, `--resume`) or use "
                                  "another folder")
        # On the CPU first: the RNG states must stay CPU tensors; the model and optimizer states
        # are copied to their parameters' device by load_state_dict.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"] != self.config:
            raise ValueError(f"{path} is a run with another configuration ({state['config']}, "
                             f"not {self.config}); use another folder to start a new run")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for name in ("epoch", "step", "images_seen", "seconds", "metrics"):
            setattr(self, name, state[name])
        return state


def write_metrics(metrics: list, out_dir) -> None:
    """metrics.json and metrics.csv (one row per epoch, METRIC_FIELDS), each written atomically."""
    atomic_json(metrics, os.path.join(out_dir, METRICS_JSON))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(metrics)
    path = os.path.join(out_dir, METRICS_CSV)
    with open(path + ".tmp", "w", newline="") as f:
        f.write(text.getvalue())
    os.replace(path + ".tmp", path)


def _pool_images(pool):
    """Images of an offline pool: a folder written by `synthesize_dataset`, (images, labels) or a
    tensor. Labels are not needed: the teacher's logits are the targets."""
    if isinstance(pool, (str, os.PathLike)):
        return load_shards(pool)[0]
    if isinstance(pool, (tuple, list)):
        return pool[0]
    return pool


def distill_offline(teacher: nn.Module, student: nn.Module, pool, epochs: int, *,
                    checkpoint_dir=None, resume: bool = False, eval_data=None, on_epoch=None,
                    **options) -> list:
    """DeepInversion distillation: trains `student` in place on a fixed pool of synthesized
    images for `epochs` passes (shuffled, last batch partial) and returns the metrics, one dict
    per epoch. The student ends in eval mode.

    pool: a `synthesize_dataset` folder, (images, labels) or an images tensor, in the teacher's
        normalized input space (the student must expect the same normalization).
    options: `KDOptions` fields (batch_size, lr, optimizer, weight_decay, T, augment, flip, seed).
    checkpoint_dir: checkpoint + metrics after every epoch; resume=True continues the run found
        there (its configuration must match).
    eval_data: (images, labels) of a real validation set: "val_acc" of each epoch.
    on_epoch(row): called after each epoch's checkpoint (raising in it stops the run resumably).
    """
    options = KDOptions(**options)
    images = _pool_images(pool)
    steps_per_epoch = math.ceil(len(images) / options.batch_size)
    run = _Run(teacher, student, options, epochs * steps_per_epoch,
               {"mode": "di", "epochs": epochs, "pool_size": len(images)}, checkpoint_dir,
               eval_data, on_epoch)
    run.restore(resume)
    images = images.to(run.device)
    student.train()
    with frozen(teacher):
        while run.epoch < epochs:
            order = torch.randperm(len(images), generator=run.generator).to(run.device)
            for batch in order.split(options.batch_size):
                run.train_step(images[batch])
            run.end_epoch(images_synthesized=len(images), pool_size=len(images))
    student.eval()
    return run.metrics


class _Pool:
    """The newest `capacity` synthesized images (first in, first out)."""

    def __init__(self, capacity: int, state=None, device=None):
        self.capacity = capacity
        self.images, self.labels, self.synthesized = None, None, 0
        if state:
            self.images, self.labels = state["images"].to(device), state["labels"].to(device)
            self.synthesized = state["synthesized"]

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.synthesized += len(labels)
        if self.images is not None:
            images, labels = torch.cat([self.images, images]), torch.cat([self.labels, labels])
        self.images, self.labels = images[-self.capacity:], labels[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randperm(len(self.images), generator=generator)[:n]
        return self.images[index.to(self.images.device)]

    def state(self) -> dict:
        return {"images": self.images, "labels": self.labels, "synthesized": self.synthesized}


def distill_adaptive(teacher: nn.Module, student: nn.Module, inverter, images: int, epochs: int,
                     *, synth_every: int = 50, synth_batch_size: int | None = None,
                     iterations=None, pool_size: int | None = None, classes=None,
                     checkpoint_dir=None, resume: bool = False, eval_data=None, on_epoch=None,
                     **options) -> list:
    """Adaptive DeepInversion distillation (the paper's setting): before every `synth_every`-th
    student step, `inverter` synthesizes a batch of `synth_batch_size` images (classes in
    round-robin) against the student as it is now, until `images` have been synthesized; they go
    into a FIFO pool of at most `pool_size` images (default: all), and every step trains on a
    random batch of the pool. An epoch is ceil(images / batch_size) steps; returns the metrics
    per epoch, as `distill_offline` (whose other arguments it shares), and leaves the student in
    eval mode.

    inverter: an `Inverter` of `teacher` with `adi_scale > 0` (with 0 this is online DI, an
        ablation without the competition term). It freezes the student while it inverts.
    iterations: inversion iterations per batch (None: the inverter's setting's).

    Cost: a synthesized batch takes `iterations` forward and backward passes of teacher and
    student on `synth_batch_size` images; a student step takes a teacher forward and a student
    forward and backward. On CIFAR-10 (ResNet-34 -> ResNet-18, 2000 iterations, 50 steps per
    batch) a batch costs ~18,000 ResNet-18 forwards against ~250 for the steps trained on it:
    inversion is ~98% of the run, and ADI costs ~1.5x offline DI of as many images (the
    student's passes during inversion). The total is set by `images` x `iterations` and by
    `epochs`; `synth_every` only spreads the synthesis over the run: small values synthesize
    everything early, against a barely trained student, large ones keep adding images chosen
    against the student as it improves (`epochs` must then leave room: ValueError otherwise).
    Unlike a DI pool, ADI images are tied to this student's training: they cannot be synthesized
    ahead of time, in parallel, or reused for another student.
    """
    from .cli import num_outputs

    options = KDOptions(**options)
    synth_batch_size = synth_batch_size or options.batch_size
    pool_size = pool_size or images
    classes = [int(c) for c in classes] if classes is not None else \
        list(range(num_outputs(teacher, inverter)))
    steps_per_epoch = math.ceil(images / options.batch_size)
    total_steps = epochs * steps_per_epoch
    batches = math.ceil(images / synth_batch_size)
    if (batches - 1) * synth_every >= total_steps:
        raise ValueError(f"{epochs} epochs of {steps_per_epoch} steps leave no room to synthesize "
                         f"{batches} batches every {synth_every} steps: raise epochs or lower "
                         "synth_every")
    config = {"mode": "adi", "epochs": epochs, "images": images, "synth_every": synth_every,
              "synth_batch_size": synth_batch_size, "iterations": iterations,
              "pool_size": pool_size, "classes": classes}
    run = _Run(teacher, student, options, total_steps, config, checkpoint_dir, eval_data,
               on_epoch)
    pool = _Pool(pool_size, run.restore(resume).get("pool"), run.device)
    student.train()
    with frozen(teacher):
        while run.epoch < epochs:
            for _ in range(steps_per_epoch):
                if run.step % synth_every == 0 and pool.synthesized < images:
                    batch = run.step // synth_every
                    targets = batch_targets(classes, images, synth_batch_size, batch)
                    new = inverter.invert(targets, iterations=iterations, student=student,
                                          seed=batch_seed(options.seed, batch))
                    pool.add(new.to(run.device), torch.tensor(targets, device=run.device))
                run.train_step(pool.sample(options.batch_size, run.generator))
            run.end_epoch(pool.synthesized, len(pool.labels), {"pool": pool.state()})
    student.eval()
    return run.metrics


def plot_accuracy(metrics, path) -> None:
    """Saves a PNG of the validation accuracy per epoch (left) and against the images synthesized
    so far (right: what the student cost in inversions; a DI run is a vertical line at its pool
    size). `metrics`: one run's rows, or {label: rows} to compare runs."""
    # The Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = metrics if isinstance(metrics, dict) else {None: metrics}
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    for axes, x in zip(figure.subplots(1, 2, sharey=True), ("epoch", "images_synthesized")):
        for label, rows in runs.items():
            rows = [r for r in rows if r.get("val_acc") is not None]
            axes.plot([r[x] for r in rows], [100 * r["val_acc"] for r in rows], marker=".",
                      label=label)
        axes.set_xlabel(x.replace("_", " "))
        axes.grid(alpha=0.3)
    axes.set_xlim(left=0)
    figure.axes[0].set_ylabel("validation accuracy (%)")
    if len(runs) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# -- dinv distill --------------------------------------------------------------------------------
# ADI's competition weight for the CLI. On digits it raised the teacher-student JS divergence of a
# batch from 0.2 (DI) to 0.6 while the teacher still classified every image as its target; the
# reference's ImageNet example uses 0.2, our CIFAR-10 recipe 10.
ADI_SCALE = 1.0

def add_distill_parser(subparsers) -> None:
    """The `dinv distill` subcommand."""
    from .cli import add_inversion_options, cmd_distill

    defaults = KDOptions()
    p = subparsers.add_parser("distill", help="data-free knowledge distillation (DI or ADI)")
    p.add_argument("--teacher", required=True,
                   help="'digits', a state_dict file with --arch, or a pickled model file")
    p.add_argument("--arch", help="dinv.models name for a state_dict teacher")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--student", help="dinv.models name (default for digits: digits_student)")
    p.add_argument("--mode", choices=["di", "adi"], default="di",
                   help="di: synthesize a pool, then distill; adi: synthesize while distilling")
    p.add_argument("--images", type=int, required=True, help="images to synthesize")
    p.add_argument("--epochs", type=int, required=True,
                   help="passes over `--images` images (student steps: epochs × images / "
                        "kd-batch-size)")
    p.add_argument("--out", required=True, help="folder: pool/, checkpoint, metrics, student.pt")
    p.add_argument("--resume", action="store_true", help="continue the run found in --out")
    p.add_argument("--batch-size", type=int, default=100, help="images per inversion batch")
    p.add_argument("--kd-batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--kd-lr", type=float, default=defaults.lr)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.optimizer)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--temperature", type=float, default=defaults.T)
    p.add_argument("--augment", type=int, default=defaults.augment,
                   help="random translation in pixels (0: none)")
    p.add_argument("--kd-flip", action="store_true", help="random flips of the student's inputs")
    p.add_argument("--adi-scale", type=float, default=ADI_SCALE,
                   help="weight of ADI's competition term (--mode adi)")
    p.add_argument("--synth-every", type=int, default=50,
                   help="student steps between two synthesized batches (--mode adi)")
    p.add_argument("--pool-size", type=int, help="most images kept (--mode adi; default: all)")
    p.add_argument("--eval-data", help="torch file of (images, labels), real validation images "
                   "in the teacher's normalization (digits: the test split)")
    add_inversion_options(p)
    p.set_defaults(fn=cmd_distill)


def _student_from_args(args) -> nn.Module:
    from . import models

    name = args.student or ("digits_student" if args.teacher == "digits" else None)
    if name is None:
        raise SystemExit("--student is required for teachers other than 'digits'")
    return models.create(name, num_classes=args.num_classes).to(args.device)


def _eval_data_from_args(args):
    from . import models

    if args.eval_data:
        images, labels = torch.load(args.eval_data, map_location="cpu", weights_only=True)
        return images, labels
    return models.load_digits("test") if args.teacher == "digits" else None


def _print_row(row: dict) -> None:
    accuracy = "" if row["val_acc"] is None else f"  val acc {100 * row['val_acc']:.2f}%"
    print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  lr {row['lr']:.4g}  "
          f"synthesized {row['images_synthesized']}{accuracy}", flush=True)


def main_from_args(args) -> list:
    """Runs `dinv distill`; returns the metrics."""
    from .cli import num_outputs, inverter_from_args, load_teacher
    from .data import synthesize_dataset

    teacher = load_teacher(args.teacher, args.arch, args.num_classes)
    inverter, iterations = inverter_from_args(
        args, teacher, adi_scale=args.adi_scale if args.mode == "adi" else 0.0)
    student = _student_from_args(args)
    classes = list(range(num_outputs(teacher, inverter)))
    common = dict(checkpoint_dir=args.out, resume=args.resume,
                  eval_data=_eval_data_from_args(args), on_epoch=_print_row,
                  batch_size=args.kd_batch_size, lr=args.kd_lr, optimizer=args.optimizer,
                  weight_decay=args.weight_decay, T=args.temperature, augment=args.augment,
                  flip=args.kd_flip, seed=args.seed)
    if args.mode == "di":
        pool = os.path.join(args.out, "pool")
        # Resumable by itself: finished batches are kept.
        synthesize_dataset(inverter, pool, args.images, classes, batch_size=args.batch_size,
                           iterations=iterations, seed=args.seed, save_png=False, progress=True)
        metrics = distill_offline(teacher, student, pool, args.epochs, **common)
    else:
        metrics = distill_adaptive(teacher, student, inverter, args.images, args.epochs,
                                   synth_every=args.synth_every,
                                   synth_batch_size=args.batch_size, iterations=iterations,
                                   pool_size=args.pool_size, classes=classes, **common)
    torch.save(student.state_dict(), os.path.join(args.out, "student.pt"))
    if metrics and metrics[-1]["val_acc"] is not None:
        plot_accuracy(metrics, os.path.join(args.out, "accuracy.png"))
    print(f"student: {os.path.join(args.out, 'student.pt')}; metrics: "
          f"{os.path.join(args.out, METRICS_CSV)}")
    return metrics
