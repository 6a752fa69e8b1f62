"""The training loop the applications share (distillation, pruning's fine-tuning, continual
learning), and the metrics they report.

`Trainer` owns what every run of a network on batches needs: the optimizer and a per-step cosine
learning rate that reaches zero at the last step, a private RNG (batch order, augmentation), the
per-epoch metrics, a progress bar, and an atomic checkpoint of all of it after every epoch from
which an interrupted run resumes to exactly the weights of an uninterrupted one (same device and
backend; CPU runs are deterministic). What a step computes is the caller's: it hands the loss to
`Trainer.step`.

Data-parallel (DDP) over several ranks: every rank draws the same batches and augmentations
(one generator, one seed), computes its share of each batch (`Trainer.share`) through
`Trainer.network`, and `step` weights its loss so that the averaged gradient is the whole
batch's; rank 0 writes the checkpoints and metrics, and every rank holds the same model.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .augment import random_flip, random_translate
from .files import atomic_save, describe_difference, load_tensors, write_metrics
from .model_utils import model_device

CHECKPOINT = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
# Columns of metrics.csv every run has; a run adds its own after these.
BASE_FIELDS = ("epoch", "step", "images_seen", "train_loss", "val_acc", "lr", "seconds")


@dataclass(frozen=True)
class TrainOptions:
    """How a network is trained (keyword arguments of the applications' functions).

    batch_size: images per step.
    lr: the initial learning rate; a per-step cosine takes it to zero at the end of the run.
    optimizer: "sgd" (Nesterov momentum 0.9) or "adam".
    weight_decay: L2 penalty on the weights.
    T: distillation temperature (for the losses that distill).
    augment: random translation (pad and crop) of each image by up to this many pixels; 0: none.
    flip: random horizontal flips. Off by default: mirroring is a prior about the domain, and a
        wrong one for digits or text.
    seed: batch order, augmentation and (ADI) synthesis seeds. The network's initialization is
        the caller's.
    """
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    T: float = 4.0
    augment: int = 2
    flip: bool = False
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) \
                or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "weight_decay", "T"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name != "weight_decay" and value == 0):
                raise ValueError(f"{name} must be a finite number > 0 (>= 0 for weight_decay), "
                                 f"got {value!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not isinstance(self.augment, int) or self.augment < 0:
            raise ValueError(f"augment must be an integer >= 0, got {self.augment!r}")


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=0.9, nesterov=True,
                               weight_decay=options.weight_decay)
    return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)


def augment_batch(images: torch.Tensor, options: TrainOptions, generator: torch.Generator):
    """The training augmentation: per-image random translation and optional flips."""
    if options.augment:
        images = random_translate(images, options.augment, generator)
    if options.flip:
        images = random_flip(images, generator)
    return images


class Trainer:
    """One network trained by steps (see the module doc).

    model: trained in place (put in train mode by `begin`, left in eval mode by `finish`).
    total_steps: the length of the run, for the learning-rate schedule.
    config: what identifies the run (JSON-able); a checkpoint of another configuration is refused.
    checkpoint_dir: where checkpoint.pt and metrics.{csv,json} go after every epoch (None: no files).
    eval_data: (images, labels) of a real validation set: each epoch's "val_acc".
    on_epoch(row): called after each epoch's checkpoint (raising in it stops the run resumably).
    fields: the run's own metric columns, after BASE_FIELDS.
    progress: a progress bar over the steps.
    ranks: `dinv.distributed.Ranks` to train data-parallel over (default: this process alone).
    """

    def __init__(self, model: nn.Module, options: TrainOptions, total_steps: int, config: dict,
                 checkpoint_dir=None, eval_data=None, on_epoch=None, fields=(),
                 progress: bool = False, description: str = "training", ranks=None):
        if total_steps < 1:
            raise ValueError("nothing to train: need epochs >= 1 and at least one image")
        self.model, self.options = model, options
        self.ranks = ranks or distributed.SINGLE
        # What computes the loss: the model, or its DDP wrapper (which averages the gradients).
        self.network = model if self.ranks.size == 1 else \
            distributed.data_parallel(model, self.ranks)
        self.device = model_device(model)
        self.optimizer = make_optimizer(model, options)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
        self.total_steps = total_steps
        # A private generator, so that the batches and augmentations do not depend on what else
        # the process draws from torch's global RNG.
        self.generator = torch.Generator().manual_seed(options.seed)
        self.config = {**config, **asdict(options)}
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.eval_data = None if eval_data is None else tuple(t.to(self.device) for t in eval_data)
        self.on_epoch = on_epoch
        self.fields = BASE_FIELDS + tuple(f for f in fields if f not in BASE_FIELDS)
        self.epoch = self.step_count = self.images_seen = 0
        self.seconds = 0.0
        self.metrics: list = []
        self._loss_sum = torch.zeros((), device=self.device)
        self._epoch_steps = 0
        self._epoch_start = time.perf_counter()
        self._progress = progress and self.ranks.first
        self._description = description
        self._bar = None

    # -- the run -----------------------------------------------------------------------------
    def begin(self) -> None:
        """Train mode, the clock and the progress bar; call after `restore`."""
        self.model.train()
        self._epoch_start = time.perf_counter()
        if self._progress and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.step_count,
                             desc=self._description, unit="step", dynamic_ncols=True)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images, self.options, self.generator)

    def share(self, images: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch (the whole batch on one process)."""
        if self.ranks.size == 1:
            return images
        start, count, _ = distributed.training_share(len(images), self.ranks)
        return images[start:start + count]

    def step(self, loss: torch.Tensor, batch_size: int) -> None:
        """One optimizer step on `loss`: a scalar computed by the caller from `batch_size`
        images (several ranks: the mean over this rank's `share` of them)."""
        if self.ranks.size > 1:
            loss = loss * distributed.training_share(batch_size, self.ranks)[2]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        # Summed on the device: a .item() per step would synchronize a GPU every step.
        self._loss_sum += loss.detach()
        self._epoch_steps += 1
        self.step_count += 1
        self.images_seen += int(batch_size)
        if self._bar is not None:
            self._bar.update(1)

    def end_epoch(self, extra_state=None, **row) -> dict:
        """Evaluates, records the epoch's metrics (the BASE_FIELDS plus `row`), checkpoints, then
        calls `on_epoch(row)`; returns the row."""
        self.epoch += 1
        self.seconds += time.perf_counter() - self._epoch_start
        distributed.broadcast_buffers(self.model, self.ranks)
        loss_sum = distributed.mean_across_ranks(self._loss_sum, self.ranks)
        record = {"epoch": self.epoch, "step": self.step_count, "images_seen": self.images_seen,
                  "train_loss": (loss_sum / max(self._epoch_steps, 1)).item(),
                  "val_acc": None if self.eval_data is None else accuracy(self.model,
                                                                          *self.eval_data),
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(self.seconds, 3),
                  **row}
        self.metrics.append(record)
        if self.checkpoint_dir is not None and self.ranks.first:
            self._save(extra_state or {})
        self._loss_sum.zero_()
        self._epoch_steps = 0
        if self._bar is not None:
            accuracy_text = "" if record["val_acc"] is None else f"{100 * record['val_acc']:.1f}%"
            self._bar.set_postfix(epoch=self.epoch, loss=f"{record['train_loss']:.4g}",
                                  val_acc=accuracy_text)
        if self.on_epoch is not None:
            self.on_epoch(record)
        self._epoch_start = time.perf_counter()
        return record

    def finish(self) -> list:
        """Eval mode, the progress bar closed; returns the metrics."""
        self.close()
        self.model.eval()
        return self.metrics

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self):
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir,
                                                                      CHECKPOINT)

    def _save(self, extra_state: dict) -> None:
        state = {"config": self.config, "epoch": self.epoch, "step": self.step_count,
                 "images_seen": self.images_seen, "seconds": self.seconds,
                 "metrics": self.metrics, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                 **extra_state}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        atomic_save(state, self.checkpoint_path)
        write_metrics(self.metrics, self.checkpoint_dir, self.fields)

    def restore(self, resume: bool) -> dict:
        """Loads the checkpoint of `checkpoint_dir` when resuming; returns it ({} if none).
        Without `resume`, an existing checkpoint is an error (a finished or interrupted run is
        never overwritten silently)."""
        path = self.checkpoint_path
        if path is None or not os.path.exists(path):
            return {}
        if not resume:
            raise FileExistsError(f"{path} exists: resume it (resume=True, `--resume`) or use "
                                  "another folder")
        # On the CPU first: the RNG states must stay CPU tensors; the model and optimizer states
        # are copied to their parameters' device by load_state_dict.
        state = load_tensors(path)
        if state.get("config") != self.config:
            differ = describe_difference(state.get("config") or {}, self.config)
            raise ValueError(f"{path} is a run with another configuration ({differ}); use "
                             "another folder to start a new run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.step_count = state["epoch"], state["step"]
        self.images_seen, self.seconds = state["images_seen"], state["seconds"]
        self.metrics = state["metrics"]
        return state


# -- metrics --------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of `model` in eval mode (its mode is restored afterwards)."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum().item()
    model.train(was_training)
    return correct / len(labels)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     epochs: int = 30, lr: float = 0.05, seed: int = 0, augment: bool = True,
                     batch_size: int = 64, weight_decay: float = 5e-4, max_shift: int = 1):
    """Trains `model` in place on labelled images with cross-entropy, SGD (Nesterov momentum
    0.9) and a per-step cosine learning rate from `lr` to zero; `augment` shifts the images by
    up to `max_shift` pixels. `seed` fixes the batch order and the shifts (the weights'
    initialization is the caller's). Runs on the model's device; returns the model, in eval
    mode."""
    options = TrainOptions(batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           augment=max_shift if augment else 0, seed=seed)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    trainer = Trainer(model, options, epochs * steps_per_epoch, {"task": "classify"})
    images, labels = images.to(trainer.device), labels.to(trainer.device)
    trainer.begin()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=trainer.generator).to(labels.device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(trainer.augment(images[batch])), labels[batch])
            trainer.step(loss, len(batch))
        trainer.end_epoch()
    trainer.finish()
    return model
