"""Synthesizing a dataset batch by batch: tensor shards + PNGs per class, resumable.

Layout of `out_dir`:
    manifest.json           the run's configuration and the finished batches
    shards/batch_00000.pt   {"images": fp16 [B, C, H, W] normalized, "labels": long [B]}
    images/<class>/b00000_i000.png   ImageFolder layout
    grid.png                preview of the latest batch

Every batch has its own seed (derived from the run's seed and the batch index), and a batch is
recorded in the manifest only after its files are written (each atomically), so an interrupted
run resumed with the same arguments produces exactly the files an uninterrupted run would, with
no batch lost or written twice.
"""
from __future__ import annotations

import json
import os

import torch

from .imaging import save_grid, to_pil

MANIFEST = "manifest.json"


def atomic_json(obj, path):
    """Writes JSON to a temporary file renamed over `path`: an interrupted run never leaves a
    truncated file behind."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save with the same all-or-nothing rename as `atomic_json`."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def batch_targets(classes, num_images: int, batch_size: int, batch: int) -> list:
    """Labels of one batch: classes in round-robin over the whole run (balanced classes)."""
    start = batch * batch_size
    return [classes[i % len(classes)] for i in range(start, min(start + batch_size, num_images))]


def batch_seed(seed: int, batch: int) -> int:
    return seed * 1_000_003 + batch


def synthesize_dataset(inverter, out_dir, num_images: int, classes, batch_size: int = 64,
                       iterations=None, seed: int = 0, student=None, save_png: bool = True,
                       class_names=None, progress: bool = False, on_batch=None) -> dict:
    """Synthesizes `num_images` images of `classes` into `out_dir` (see the module doc); resumes
    a previous run of the same configuration. Returns the manifest."""
    classes = [int(c) for c in classes]
    if num_images < 1 or batch_size < 1 or not classes:
        raise ValueError("need num_images >= 1, batch_size >= 1 and at least one class")
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    config = {"num_images": num_images, "batch_size": batch_size, "classes": classes,
              "iterations": iterations, "seed": seed, "image_shape": list(inverter.image_shape),
              "mean": list(inverter.mean), "std": list(inverter.std)}
    path = os.path.join(out_dir, MANIFEST)
    manifest = {"config": config, "completed": []}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous["config"] != config:
            raise ValueError(f"{out_dir} holds a run with another configuration "
                             f"({previous['config']}); use a new folder to start a new run")
        manifest = previous
    num_batches = -(-num_images // batch_size)
    todo = [b for b in range(num_batches) if b not in set(manifest["completed"])]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, initial=num_batches - len(todo), desc="batches",
                   unit="batch", position=0)
    for batch in todo:
        targets = batch_targets(classes, num_images, batch_size, batch)
        images = inverter.invert(targets, iterations=iterations, student=student,
                                 seed=batch_seed(seed, batch))
        labels = torch.tensor(targets)
        if save_png:
            for index, (image, label) in enumerate(zip(to_pil(images, inverter.mean,
                                                               inverter.std), targets)):
                name = class_names[label] if class_names else f"{label:03d}"
                folder = os.path.join(out_dir, "images", name)
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, f".b{batch:05d}_i{index:03d}.png")
                image.save(tmp, format="PNG")
                os.replace(tmp, os.path.join(folder, f"b{batch:05d}_i{index:03d}.png"))
        atomic_save({"images": images.detach().cpu().half(), "labels": labels},
                    os.path.join(out_dir, "shards", f"batch_{batch:05d}.pt"))
        save_grid(images, os.path.join(out_dir, "grid.png"), inverter.mean, inverter.std,
                  nrow=min(len(classes), 10), upscale=max(1, 64 // inverter.image_shape[-1]))
        manifest["completed"] = sorted(manifest["completed"] + [batch])
        atomic_json(manifest, path)
        if on_batch is not None:
            on_batch(batch, images, labels)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return manifest


def load_shards(out_dir):
    """(images fp32 [N, C, H, W] normalized, labels long [N]) of a synthesized dataset."""
    with open(os.path.join(out_dir, MANIFEST)) as f:
        completed = json.load(f)["completed"]
    if not completed:
        raise FileNotFoundError(f"{out_dir} has no finished batch")
    parts = [torch.load(os.path.join(out_dir, "shards", f"batch_{b:05d}.pt")) for b in completed]
    return (torch.cat([p["images"] for p in parts]).float(),
            torch.cat([p["labels"] for p in parts]))
