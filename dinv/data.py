"""Synthesized data: a dataset written batch by batch (tensor shards + PNGs per class, resumable
and verified), and the bounded replay pool that online synthesis (ADI) trains from.

Layout of `out_dir`:
    manifest.json           the run's configuration, the finished batches, each shard's size and
                            SHA-256
    progress/rank_00001.json  (while several ranks run) the batches one rank finished
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

Under torchrun (an initialized default process group) the ranks share the batches (independent
batches, `dinv.distributed.round_robin`): rank r synthesizes batches r, r + N, ... with the seeds
one process would use, so the dataset is the one a single process writes. Each rank records its
finished batches in its own progress file; rank 0 gathers them into the one manifest at the end,
and merges the progress files of an interrupted run when it resumes (with any number of ranks),
so no batch is lost or synthesized twice whichever rank died. With an Inverter of a global batch
(`distributed=True`) every rank works on every batch and rank 0 writes the files.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from . import distributed
from ._version import __version__
from .files import (DamagedFile, atomic_json, atomic_save, describe_difference, file_digest,
                    load_tensors)
from .imaging import save_grid, to_pil
from .model_utils import state_hash

MANIFEST = "manifest.json"
PROGRESS = "progress"


def batch_targets(classes, num_images: int, batch_size: int, batch: int) -> list:
    """Labels of one batch: classes in round-robin over the whole run (balanced classes)."""
    start = batch * batch_size
    return [classes[i % len(classes)] for i in range(start, min(start + batch_size, num_images))]


def batch_seed(seed: int, batch: int) -> int:
    return seed * 1_000_003 + batch


def shard_name(batch: int) -> str:
    return os.path.join("shards", f"batch_{batch:05d}.pt")


def progress_name(rank: int) -> str:
    return os.path.join(PROGRESS, f"rank_{rank:05d}.json")


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
    for folder in ("shards", "images", PROGRESS):
        shutil.rmtree(os.path.join(out_dir, folder), ignore_errors=True)


def _progress_records(out_dir) -> list:
    """Paths of the ranks' progress files of an interrupted multi-rank run."""
    folder = os.path.join(out_dir, PROGRESS)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.startswith("rank_") and name.endswith(".json"))


def _merge(manifest, shards: dict) -> None:
    """Adds finished batches (batch -> shard digest) to a manifest."""
    manifest["shards"].update(shards)
    manifest["completed"] = sorted(set(manifest["completed"]) | {int(b) for b in shards})


def _prepare(out_dir, config, overwrite: bool, write: bool) -> dict:
    """The manifest to continue from: a previous run's (refused if of another configuration),
    with the batches of its ranks' progress files merged in, keeping only the batches whose
    shards verify. Written when it merged progress files (which are then deleted) or when
    `write` (a multi-rank run: its configuration is on disk before any progress file)."""
    path = os.path.join(out_dir, MANIFEST)
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
    records = _progress_records(out_dir)
    for record in records:
        try:
            with open(record) as f:
                shards = json.load(f)["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged since (it is written atomically): its batches are redone
        _merge(manifest, shards)
    manifest["completed"] = verified_batches(out_dir, manifest)
    manifest["shards"] = {str(b): manifest["shards"][str(b)] for b in manifest["completed"]}
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    if records or write:
        atomic_json(manifest, path)
    for record in records:
        os.remove(record)
    return manifest


def synthesize_dataset(inverter, out_dir, num_images: int, classes, batch_size: int = 64,
                       iterations=None, seed: int = 0, student=None, save_png: bool = True,
                       class_names=None, progress: bool = False, on_batch=None,
                       overwrite: bool = False) -> dict:
    """Synthesizes `num_images` images of `classes` into `out_dir` (see the module doc); resumes
    a previous run of the same configuration, refuses one of another configuration unless
    `overwrite` (which deletes it first). Returns the manifest (on every rank).

    on_batch(batch, images, labels): called after each batch is recorded, on the rank that
    synthesized it (with a global batch: on every rank)."""
    classes = [int(c) for c in classes]
    if num_images < 1 or batch_size < 1 or not classes:
        raise ValueError("need num_images >= 1, batch_size >= 1 and at least one class")
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    config = dataset_config(inverter, num_images, batch_size, classes, iterations, seed, student)
    global_batches = inverter.ranks is not None
    ranks = inverter.ranks if global_batches else distributed.current()
    # Rank 0 alone reads, verifies and merges what is on disk; every rank continues from its
    # answer, so that they all agree on what is left to do.
    independent = ranks.size > 1 and not global_batches
    manifest = distributed.on_first_rank(
        lambda: _prepare(out_dir, config, overwrite, write=independent), ranks)
    num_batches = -(-num_images // batch_size)
    done = set(manifest["completed"])
    todo = [b for b in range(num_batches) if b not in done]
    mine = distributed.round_robin(todo, ranks) if independent else todo
    # In a global batch every rank has the images; rank 0 writes them.
    writes = not global_batches or ranks.first
    finished = {}  # independent ranks: this rank's batches -> shard digest (its progress file)
    bar = None
    if progress and ranks.first:
        from tqdm.auto import tqdm

        share = f" (rank 0's share of {ranks.size} ranks)" if independent else ""
        bar = tqdm(total=num_batches - len(todo) + len(mine), initial=num_batches - len(todo),
                   desc="batches" + share, unit="batch", position=0)
    try:
        for batch in mine:
            targets = batch_targets(classes, num_images, batch_size, batch)
            images = inverter.invert(targets, iterations=iterations, student=student,
                                     seed=batch_seed(seed, batch))
            labels = torch.tensor(targets)
            if writes:
                record = _write_batch(images, labels, batch, out_dir, inverter, save_png,
                                      class_names, grid_rows=min(len(classes), 10) if ranks.first
                                      else 0)
                if independent:
                    finished[str(batch)] = record
                    atomic_json({"shards": finished},
                                os.path.join(out_dir, progress_name(ranks.rank)))
                else:
                    manifest["shards"][str(batch)] = record
                    manifest["completed"] = sorted(manifest["completed"] + [batch])
                    atomic_json(manifest, path)
            if on_batch is not None:
                on_batch(batch, images, labels)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if independent:
        # Every rank has finished (the gather waits for all); rank 0 records their batches.
        parts = distributed.gather_objects(finished, ranks)
        manifest = distributed.on_first_rank(lambda: _record(out_dir, manifest, parts), ranks)
    elif global_batches:
        # Rank 0 wrote the files and kept the records: every rank returns after it, with them.
        manifest = distributed.on_first_rank(lambda: manifest, ranks)
    return manifest


def _write_batch(images, labels, batch, out_dir, inverter, save_png, class_names,
                 grid_rows: int) -> dict:
    """Writes a batch's PNGs, its shard and (grid_rows > 0) the preview grid; returns the
    shard's digest."""
    if save_png:
        _save_pngs(images, labels.tolist(), out_dir, batch, inverter, class_names)
    shard = os.path.join(out_dir, shard_name(batch))
    atomic_save({"images": images.detach().cpu().half(), "labels": labels}, shard)
    if grid_rows:
        save_grid(images, os.path.join(out_dir, "grid.png"), inverter.mean, inverter.std,
                  nrow=grid_rows, upscale=max(1, 64 // inverter.image_shape[-1]))
    return file_digest(shard)


def _record(out_dir, manifest, parts) -> dict:
    """The manifest with every rank's finished batches (`parts`: batch -> digest per rank),
    written; the ranks' progress files, now redundant, removed."""
    for shards in parts:
        _merge(manifest, shards)
    atomic_json(manifest, os.path.join(out_dir, MANIFEST))
    for record in _progress_records(out_dir):
        os.remove(record)
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
