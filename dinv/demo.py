"""`dinv demo`: DeepInversion end to end on scikit-learn's bundled digits, no downloads.

The shipped teacher (a small BN CNN trained on the real digits) is inverted into `per_class`
images of each digit, with settings chosen for images a person recognizes
(`dinv.presets.DIGITS_PREVIEW`; `dinv invert` / `dinv distill` use `DIGITS`, which teaches
better students); the demo saves them (shards, PNGs per class, grid.png) and reports how the
teacher classifies them and how far their BatchNorm statistics are from noise's."""
from __future__ import annotations

import os
import time

import torch

from .data import load_shards, synthesize_dataset
from .inverter import Inverter
from .models import load_digits_teacher
from .presets import DIGITS_PREVIEW


def run_demo(out_dir: str = "dinv-demo", per_class: int = 20, iterations: int | None = None,
             seed: int = 0, batch_size: int = 100, progress: bool = True) -> dict:
    teacher = load_digits_teacher()
    settings = dict(DIGITS_PREVIEW)
    default_iterations = settings.pop("iterations")
    with Inverter(teacher, **settings) as inverter:
        start = time.time()
        synthesize_dataset(inverter, out_dir, num_images=10 * per_class, classes=range(10),
                           batch_size=batch_size, iterations=iterations or default_iterations,
                           seed=seed, progress=progress)
        seconds = time.time() - start
        images, labels = load_shards(out_dir)
        with torch.no_grad():
            predicted = teacher(images).argmax(1)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return {
            "images": int(labels.numel()),
            "seconds": round(seconds, 1),
            "teacher_accuracy_on_synthesized": round((predicted == labels).float().mean().item(),
                                                     4),
            "bn_loss_synthesized": round(inverter.bn_losses(images[:batch_size]).sum().item(), 4),
            "bn_loss_noise": round(inverter.bn_losses(noise[:batch_size]).sum().item(), 4),
            "grid": os.path.join(out_dir, "grid.png"),
        }
