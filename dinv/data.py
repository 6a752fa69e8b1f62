"""Synthesized data: a dataset written batch by batch (tensor shards + PNGs per class, resumable
and verified), and the bounded replay pool that online synthesis (ADI) trains from.

Layout of `out_dir`:
    manifest.json           the run's configuration, the finished batches, each shard's size and
                            SHA-256
    shards/batch_00000.pt   {"images": fp16 [B, C, H, W] normalized, "labels": long [B]}
    images/<class>/b00000_i000.png   ImageFolder layout
    grid.png                preview of the latest batch

Every batch has its own seed (derived from the run's seed and the batch index), and a batch is
recorded in the manifest only after its files are written (each atomically), so an interrupted
run resumed with the same arguments produces exactly the files an uninterrupted run would, with
no batch lost or written twice. The manifest records everything that decides the images (the
teacher's weights by hash, every inversion setting, shape, normalization, seed, dinv's version):
a rerun with anything else refuses to mix the two runs and says what differs. A shard that was
deleted, truncated or altered since is noticed on resume and synthesized again.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ._version import __version__
from .files import (DamagedFile, atomic_json, atomic_save, describe_difference, file_digest,
                    load_tensors)
from .imaging import save_grid, to_pil
from .model_utils import state_hash

MANIFEST = "manifest.json"


def batch_targets(classes, num_images: int, batch_size: int, batch: int) -> list:
    """Labels of one batch: classes in round-robin over the whole run (balanced classes)."""
    start = batch * batch_size
    return [classes[i % len(classes)] for i in range(start, min(start + batch_size, num_images))]


def batch_seed(seed: int, batch: int) -> int:
    return seed * 1_000_003 + batch


def shard_name(batch: int) -> str:
    return os.path.join("shards", f"batch_{batch:05d}.pt")


def dataset_config(inverter, num_images, batch_size, classes, iterations, seed, student) -> dict:
    """What decides a synthesized dataset's images (the manifest's "config")."""
    return {"num_images": num_images, "batch_size": batch_size, "classes": classes,
            "iterations": iterations, "seed": seed, "inverter": inverter.settings(),
            "teacher_sha256": state_hash(inverter.teacher),
            "student_sha256": None if student is None else state_hash(student),
            "dinv_version": __version__}


def _read_manifest(path):
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise DamagedFile(f"{path} cannot be read ({error}): remove the folder or pass "
                          "overwrite=True (`--overwrite`) to start afresh") from error
    if not isinstance(manifest, dict) or "config" not in manifest or "completed" not in manifest:
        raise DamagedFile(f"{path} is not a dinv dataset manifest")
    return manifest


def verified_batches(out_dir, manifest) -> list:
    """The completed batches whose shard is on disk with the recorded size and hash."""
    good = []
    for batch in manifest["completed"]:
        record = manifest.get("shards", {}).get(str(batch))
        path = os.path.join(out_dir, shard_name(batch))
        if record is None or not os.path.exists(path) or \
                os.path.getsize(path) != record["bytes"] or file_digest(path) != record:
            continue
        good.append(batch)
    return good


def _clear(out_dir) -> None:
    for name in (MANIFEST, "grid.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for folder in ("shards", "images"):
        shutil.rmtree(os.path.join(out_dir, folder), ignore_errors=True)


def synthesize_dataset(inverter, out_dir, num_images: int, classes, batch_size: int = 64,
                       iterations=None, seed: int = 0, student=None, save_png: bool = True,
                       class_names=None, progress: bool = False, on_batch=None,
                       overwrite: bool = False) -> dict:
    """Synthesizes `num_images` images of `classes` into `out_dir` (see the module doc); resumes
    a previous run of the same configuration, refuses one of another configuration unless
    `overwrite` (which deletes it first). Returns the manifest."""
    classes = [int(c) for c in classes]
    if num_images < 1 or batch_size < 1 or not classes:
        raise ValueError("need num_images >= 1, batch_size >= 1 and at least one class")
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    config = dataset_config(inverter, num_images, batch_size, classes, iterations, seed, student)
    if overwrite:
        _clear(out_dir)
    manifest = {"config": config, "completed": [], "shards": {}}
    if os.path.exists(path):
        previous = _read_manifest(path)
        if previous["config"] != config:
            raise ValueError(f"{out_dir} holds a run with another configuration ("
                             f"{describe_difference(previous['config'], config)}); use another "
                             "folder, or overwrite=True (`--overwrite`) to start afresh")
        manifest = previous
        manifest["completed"] = verified_batches(out_dir, manifest)
        manifest["shards"] = {str(b): manifest["shards"][str(b)] for b in manifest["completed"]}
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    num_batches = -(-num_images // batch_size)
    done = set(manifest["completed"])
    todo = [b for b in range(num_batches) if b not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, initial=num_batches - len(todo), desc="batches",
                   unit="batch", position=0)
    try:
        for batch in todo:
            targets = batch_targets(classes, num_images, batch_size, batch)
            images = inverter.invert(targets, iterations=iterations, student=student,
                                     seed=batch_seed(seed, batch))
            labels = torch.tensor(targets)
            if save_png:
                _save_pngs(images, targets, out_dir, batch, inverter, class_names)
            shard = os.path.join(out_dir, shard_name(batch))
            atomic_save({"images": images.detach().cpu().half(), "labels": labels}, shard)
            save_grid(images, os.path.join(out_dir, "grid.png"), inverter.mean, inverter.std,
                      nrow=min(len(classes), 10),
                      upscale=max(1, 64 // inverter.image_shape[-1]))
            manifest["shards"][str(batch)] = file_digest(shard)
            manifest["completed"] = sorted(manifest["completed"] + [batch])
            atomic_json(manifest, path)
            if on_batch is not None:
                on_batch(batch, images, labels)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return manifest


def _save_pngs(images, targets, out_dir, batch, inverter, class_names) -> None:
    for index, (image, label) in enumerate(zip(to_pil(images, inverter.mean, inverter.std),
                                               targets)):
        name = class_names[label] if class_names else f"{label:03d}"
        folder = os.path.join(out_dir, "images", name)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".b{batch:05d}_i{index:03d}.png")
        image.save(tmp, format="PNG")
        os.replace(tmp, os.path.join(folder, f"b{batch:05d}_i{index:03d}.png"))


def load_shards(out_dir, verify: bool = True):
    """(images fp32 [N, C, H, W] normalized, labels long [N]) of a synthesized dataset. With
    `verify`, every shard's size and hash are checked against the manifest; an error names the
    damaged file."""
    out_dir = os.fspath(out_dir)
    manifest = _read_manifest(os.path.join(out_dir, MANIFEST))
    completed = manifest["completed"]
    if not completed:
        raise FileNotFoundError(f"{out_dir} has no finished batch")
    parts = []
    for batch in completed:
        path = os.path.join(out_dir, shard_name(batch))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: rerun the synthesis to recompute it")
        record = manifest.get("shards", {}).get(str(batch))
        if verify and record is not None and file_digest(path) != record:
            raise DamagedFile(f"{path} was changed or truncated since it was written "
                              f"({os.path.getsize(path)} bytes, recorded {record['bytes']}): "
                              "rerun the synthesis to recompute it")
        part = load_tensors(path)
        if not isinstance(part, dict) or "images" not in part or "labels" not in part:
            raise DamagedFile(f"{path} is not a dinv shard")
        parts.append(part)
    return (torch.cat([p["images"] for p in parts]).float(),
            torch.cat([p["labels"] for p in parts]))


class ReplayPool:
    """The newest `capacity` synthesized images and their labels (first in, first out), with
    the count of all images ever added; `state()` / `ReplayPool(capacity, state)` save and
    restore it with a checkpoint."""

    def __init__(self, capacity: int, state=None, device=None):
        if capacity < 1:
            raise ValueError(f"a replay pool needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.images, self.labels, self.synthesized = None, None, 0
        if state:
            self.images, self.labels = state["images"].to(device), state["labels"].to(device)
            self.synthesized = state["synthesized"]

    def __len__(self) -> int:
        return 0 if self.labels is None else len(self.labels)

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.synthesized += len(labels)
        if self.images is not None:
            images, labels = torch.cat([self.images, images]), torch.cat([self.labels, labels])
        self.images, self.labels = images[-self.capacity:], labels[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator):
        """(images, labels) of `n` distinct entries drawn with `generator` (a CPU generator)."""
        if not len(self):
            raise RuntimeError("sampling an empty replay pool")
        index = torch.randperm(len(self), generator=generator)[:n].to(self.images.device)
        return self.images[index], self.labels[index]

    def state(self) -> dict:
        return {"images": self.images, "labels": self.labels, "synthesized": self.synthesized}
