"""Data-free knowledge distillation: a student learns from a teacher on synthesized images only
(Yin et al., CVPR 2020, "data-free knowledge transfer").

    distill_offline   DeepInversion (DI): the images are synthesized once (`dinv invert`,
                      `dinv.data.synthesize_dataset`), then the student is distilled on that pool.
    distill_adaptive  Adaptive DeepInversion (ADI): new batches are synthesized while the student
                      trains, each against the current student (the competition term seeks images
                      the two disagree on), into a bounded pool the student keeps training on.

Both minimize Hinton's T²·KL (`dinv.ops.kd_loss`) between the student's logits and the frozen
teacher's on the same augmented batch (`kd_step`), on `dinv.training.Trainer`: SGD or Adam with a
per-step cosine learning rate to zero, and with a `checkpoint_dir`, an atomic checkpoint after
every epoch, metrics.csv / metrics.json there, and `resume=True` continuing to exactly the weights
of an uninterrupted run (same device and backend; CPU runs are deterministic).

Under torchrun (an initialized default process group) both train the student data-parallel
(DDP, see `dinv.training`): every rank takes its share of each batch. ADI synthesizes one batch
per rank at each synthesis step (rank r: batch k·N + r, with that batch's seed), against the
student as it is then, and every rank adds all of them to its (identical) pool; with an
Inverter of one global batch (`distributed=True`) the ranks synthesize each batch together.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import distributed, ops
from .data import ReplayPool, batch_seed, batch_targets, load_shards
from .model_utils import frozen, num_outputs
from .training import TrainOptions, Trainer

# What distillation adds to the training metrics.
DISTILL_FIELDS = ("images_synthesized", "pool_size")
# Kept under its first name: the distillation options are the shared training options.
KDOptions = TrainOptions


def kd_step(trainer: Trainer, teacher: nn.Module, images: torch.Tensor) -> None:
    """One distillation step of `trainer`'s model on a batch: both networks see the same
    augmented images (this rank's share of them); the loss is T²·KL(teacher ‖ student) at the
    trainer's temperature."""
    x = trainer.share(trainer.augment(images))
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = ops.kd_loss(trainer.network(x), teacher_logits, trainer.options.T)
    trainer.step(loss, len(images))


def pool_images(pool) -> torch.Tensor:
    """Images of an offline pool: a folder written by `synthesize_dataset`, (images, labels) or a
    tensor. Labels are not needed: the teacher's logits are the targets."""
    if isinstance(pool, (str, os.PathLike)):
        return load_shards(pool)[0]
    if isinstance(pool, (tuple, list)):
        return pool[0]
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"pool must be a dataset folder, (images, labels) or an images tensor, "
                        f"got {type(pool).__name__}")
    return pool


def _check_epochs(epochs) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")


def distill_offline(teacher: nn.Module, student: nn.Module, pool, epochs: int, *,
                    checkpoint_dir=None, resume: bool = False, eval_data=None, on_epoch=None,
                    progress: bool = False, **options) -> list:
    """DeepInversion distillation: trains `student` in place on a fixed pool of synthesized
    images for `epochs` passes (shuffled, last batch partial) and returns the metrics, one dict
    per epoch. The student ends in eval mode.

    pool: a `synthesize_dataset` folder, (images, labels) or an images tensor, in the teacher's
        normalized input space (the student must expect the same normalization).
    options: `TrainOptions` fields (batch_size, lr, optimizer, weight_decay, T, augment, flip,
        seed).
    checkpoint_dir: checkpoint + metrics after every epoch; resume=True continues the run found
        there (its configuration must match).
    eval_data: (images, labels) of a real validation set: "val_acc" of each epoch.
    on_epoch(row): called after each epoch's checkpoint (raising in it stops the run resumably).
    progress: a progress bar over the steps.
    """
    options = TrainOptions(**options)
    _check_epochs(epochs)
    images = pool_images(pool)
    if len(images) == 0:
        raise ValueError("the pool is empty")
    steps_per_epoch = math.ceil(len(images) / options.batch_size)
    trainer = Trainer(student, options, epochs * steps_per_epoch,
                      {"mode": "di", "epochs": epochs, "pool_size": len(images)}, checkpoint_dir,
                      eval_data, on_epoch, DISTILL_FIELDS, progress, "distilling",
                      distributed.current())
    trainer.restore(resume)
    images = images.to(trainer.device)
    trainer.begin()
    try:
        with frozen(teacher):
            while trainer.epoch < epochs:
                order = torch.randperm(len(images), generator=trainer.generator)
                for batch in order.to(trainer.device).split(options.batch_size):
                    kd_step(trainer, teacher, images[batch])
                trainer.end_epoch(images_synthesized=len(images), pool_size=len(images))
    finally:
        trainer.close()
    return trainer.finish()


def check_adaptive_schedule(images: int, epochs: int, batch_size: int, synth_batch_size: int,
                            synth_every: int) -> None:
    """ValueError unless a run of `epochs` epochs (ceil(images / batch_size) steps each) has
    room to synthesize all its batches, one every `synth_every` steps."""
    _check_epochs(epochs)
    if images < 1 or synth_every < 1 or synth_batch_size < 1:
        raise ValueError(f"need images, synth_every and synth_batch_size >= 1, got {images}, "
                         f"{synth_every}, {synth_batch_size}")
    steps_per_epoch = math.ceil(images / batch_size)
    batches = math.ceil(images / synth_batch_size)
    if (batches - 1) * synth_every >= epochs * steps_per_epoch:
        raise ValueError(f"{epochs} epochs of {steps_per_epoch} steps leave no room to synthesize "
                         f"{batches} batches every {synth_every} steps: raise epochs or lower "
                         "synth_every")


def distill_adaptive(teacher: nn.Module, student: nn.Module, inverter, images: int, epochs: int,
                     *, synth_every: int = 50, synth_batch_size: int | None = None,
                     iterations=None, pool_size: int | None = None, classes=None,
                     initial_pool=None, checkpoint_dir=None, resume: bool = False,
                     eval_data=None, on_epoch=None, progress: bool = False, **options) -> list:
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
    initial_pool: DI images to start from (a dataset folder, (images, labels) or a tensor): the
        paper's authors seed ADI with DeepInversion images, so the first steps do not train on
        one batch alone. They count toward the pool, not toward `images`.

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
    options = TrainOptions(**options)
    synth_batch_size = synth_batch_size or options.batch_size
    seeded = None if initial_pool is None else pool_images(initial_pool)
    pool_size = pool_size or images + (0 if seeded is None else len(seeded))
    classes = [int(c) for c in classes] if classes is not None else \
        list(range(num_outputs(teacher, inverter.image_shape, inverter.output_function)))
    check_adaptive_schedule(images, epochs, options.batch_size, synth_batch_size, synth_every)
    steps_per_epoch = math.ceil(images / options.batch_size)
    total_steps = epochs * steps_per_epoch
    config = {"mode": "adi", "epochs": epochs, "images": images, "synth_every": synth_every,
              "synth_batch_size": synth_batch_size, "iterations": iterations,
              "pool_size": pool_size, "classes": classes,
              "initial_pool": 0 if seeded is None else len(seeded),
              "inverter": inverter.settings()}
    trainer = Trainer(student, options, total_steps, config, checkpoint_dir, eval_data, on_epoch,
                      DISTILL_FIELDS, progress, "distilling (ADI)", distributed.current())
    state = trainer.restore(resume)
    pool = ReplayPool(pool_size, state.get("pool"), trainer.device)
    if not state and seeded is not None:
        pool.add(seeded.to(trainer.device), torch.full((len(seeded),), -1, device=trainer.device))
        pool.synthesized = 0
    trainer.begin()
    try:
        with frozen(teacher):
            while trainer.epoch < epochs:
                for _ in range(steps_per_epoch):
                    step = trainer.step_count
                    if step % synth_every == 0 and pool.synthesized < images:
                        pool.add(*_synthesis_round(inverter, student, classes, images,
                                                   synth_batch_size, iterations, options.seed,
                                                   step // synth_every, trainer))
                    kd_step(trainer, teacher, pool.sample(options.batch_size, trainer.generator)[0])
                trainer.end_epoch({"pool": pool.state()}, images_synthesized=pool.synthesized,
                                  pool_size=len(pool))
    finally:
        trainer.close()
    return trainer.finish()


def _synthesis_round(inverter, student, classes, images: int, synth_batch_size: int, iterations,
                     seed: int, round_index: int, trainer: Trainer):
    """(images, labels) of a synthesis step's batches, one per rank (rank r: batch
    round_index·N + r, if the run has it), each against the student as it is now; every rank
    gets all of them, in batch order. An inverter of one global batch (`distributed=True`)
    synthesizes batch round_index on all ranks together instead."""
    # Batch index -> rank: the ranks of a global batch invert each batch together.
    ranks = distributed.SINGLE if inverter.ranks is not None else trainer.ranks
    first = round_index * ranks.size
    targets = [batch_targets(classes, images, synth_batch_size, batch)
               for batch in range(first, first + ranks.size)]
    mine = first + ranks.rank
    if targets[ranks.rank]:
        new = inverter.invert(targets[ranks.rank], iterations=iterations, student=student,
                              seed=batch_seed(seed, mine)).to(trainer.device)
    else:  # the run's last batches went to the lower ranks
        new = torch.empty((0,) + tuple(inverter.image_shape), dtype=inverter.dtype,
                          device=trainer.device)
    new = distributed.gather_rows(new, [len(t) for t in targets], ranks)
    return new, torch.tensor([label for batch in targets for label in batch],
                             dtype=torch.long, device=trainer.device)
