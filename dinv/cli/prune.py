"""`dinv prune`: data-free structured pruning of a teacher on synthesized images, then KD
fine-tuning from the unpruned teacher on the same images; resumable with `--resume`.

What goes into --out:
    pool/                      the synthesized images (--num-images; resumable by themselves)
    latency-<device>-*.json    the measured latency table (--hardware-aware, --latency-ratio)
    prune.json, pruned-initial.pt   the pruning's configuration and result, the network before
                               fine-tuning (reused on --resume instead of pruning again)
    finetune/                  the fine-tuning's checkpoint and metrics (dinv.distill)
    pruned.pt                  the fine-tuned network: state_dict + layer shapes + --arch, read
                               back with dinv.prune.load_pruned (no unpickling of code)
    report.json, report.csv    MACs, parameters, measured latency and accuracy of the teacher,
                               the pruned and the fine-tuned network
    accuracy_latency.png, accuracy.png   plots (with real validation data)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

from .common import (UsageError, add_inversion_options, add_teacher_options, nonnegative_float,
                     nonnegative_int, positive_float, positive_int, teacher_from_args)

PRUNE_JSON = "prune.json"
INITIAL = "pruned-initial.pt"
FINAL = "pruned.pt"
FINETUNE_DIR = "finetune"
REPORT_FIELDS = ("model", "macs", "params", "latency_ms", "accuracy")
# η of --hardware-aware: an average channel's latency saving weighs like an average channel's
# importance (both are normalized by their means).
ETA = 1.0


def ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) (what is kept), got {text}")
    return value


def add_parser(subparsers) -> None:
    from ..prune import CRITERIA
    from ..training import TrainOptions

    defaults = TrainOptions()
    p = subparsers.add_parser("prune", help="data-free structured pruning + KD fine-tuning")
    add_teacher_options(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of synthesized images (`dinv invert`)")
    source.add_argument("--num-images", type=positive_int, help="images to synthesize")
    p.add_argument("--batch-size", type=positive_int, default=100,
                   help="images per inversion batch")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--macs-ratio", type=ratio, help="fraction of the MACs kept (default 0.5)")
    target.add_argument("--params-ratio", type=ratio, help="fraction of the parameters kept")
    target.add_argument("--latency-ratio", type=ratio,
                        help="fraction of the latency kept (by a table measured on --device)")
    target.add_argument("--channels-ratio", type=ratio,
                        help="fraction of the prunable channels kept")
    p.add_argument("--importance", choices=CRITERIA, default="taylor")
    p.add_argument("--steps", type=positive_int, default=5, help="iterative pruning steps")
    p.add_argument("--hardware-aware", action="store_true",
                   help="rank channels by importance minus eta x latency saved (a table "
                        "measured on --device)")
    p.add_argument("--eta", type=nonnegative_float, default=None,
                   help=f"latency weight of --hardware-aware (default {ETA})")
    p.add_argument("--latency-batch", type=positive_int, default=1,
                   help="batch the latency is measured at (at most the number of images)")
    p.add_argument("--finetune-epochs", type=nonnegative_int, required=True,
                   help="KD epochs from the unpruned teacher on the images (0: none)")
    p.add_argument("--kd-batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--kd-lr", type=positive_float, default=defaults.lr)
    p.add_argument("--temperature", type=positive_float, default=defaults.T)
    p.add_argument("--eval-data", help="torch file of (images, labels), real validation images "
                   "in the teacher's normalization (digits: the test split)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run found in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a synthesized pool of another configuration found in --out/pool")
    add_inversion_options(p)
    p.set_defaults(run=run)


def _check(args) -> tuple:
    """(target keyword arguments, eta, architecture name) of valid arguments, else UsageError."""
    from ..prune import TARGETS

    if args.eta is not None and not args.hardware_aware:
        raise UsageError("--eta is the weight of --hardware-aware: add --hardware-aware")
    arch = "digits_net" if args.teacher == "digits" else args.arch
    if arch is None:
        raise UsageError("--arch is needed: the pruned network is saved as a state_dict and the "
                         "layer shapes, rebuilt from the teacher's architecture")
    targets = {f"{name}_ratio": getattr(args, f"{name}_ratio") for name in TARGETS
               if getattr(args, f"{name}_ratio") is not None} or {"macs_ratio": 0.5}
    eta = (ETA if args.eta is None else args.eta) if args.hardware_aware else 0.0
    return targets, eta, arch


def _images(args, teacher):
    """(pool folder, images, labels): the --images folder, or --num-images synthesized into
    --out/pool (resumable), checked against the teacher's input shape."""
    from ..data import load_shards, synthesize_dataset
    from ..model_utils import num_outputs
    from .common import inverter_from_args, inverter_settings

    shape = tuple(inverter_settings(args, teacher)[0]["image_shape"])
    if args.images is not None:
        pool = args.images
        images, labels = load_shards(pool)
        if tuple(images.shape[1:]) != shape:
            raise UsageError(f"--images {pool} holds {tuple(images.shape[1:])} images but the "
                             f"teacher takes {shape} (--image-shape)")
        return pool, images, labels
    inverter, iterations = inverter_from_args(args, teacher)
    pool = os.path.join(args.out, "pool")
    synthesize_dataset(inverter, pool, args.num_images,
                       range(num_outputs(teacher, inverter.image_shape)),
                       batch_size=args.batch_size, iterations=iterations, seed=args.seed,
                       save_png=False, progress=True, overwrite=args.overwrite)
    return (pool, *load_shards(pool))


def _pruned(args, teacher, images, labels, config: dict, targets: dict, eta: float, arch: str,
            classes: int):
    """The pruning's result summary and the network before fine-tuning: read back from --out
    when resuming a run of the same configuration, else computed and saved there."""
    from ..files import atomic_json, describe_difference
    from ..prune import LatencyTable, load_pruned, prune, save_pruned

    record_path = os.path.join(args.out, PRUNE_JSON)
    if os.path.exists(record_path):
        if not args.resume:
            raise FileExistsError(f"{record_path} exists: add --resume to continue that run, or "
                                  "use another --out")
        with open(record_path) as f:
            record = json.load(f)
        if record.get("config") != config:
            raise ValueError(f"{args.out} is a run with another configuration ("
                             f"{describe_difference(record.get('config') or {}, config)}); use "
                             "another --out")
        return record["result"], load_pruned(os.path.join(args.out, INITIAL)).to(args.device)
    example = images[:args.latency_batch]
    table = None
    if eta > 0 or "latency_ratio" in targets:
        table = LatencyTable.measure(teacher, example, cache_dir=args.out, progress=True)
    result = prune(teacher, images, targets=labels, example_inputs=example,
                   importance=args.importance, latency_table=table, eta=eta, steps=args.steps,
                   seed=args.seed, temperature=args.temperature, progress=True, **targets)
    save_pruned(result.model, os.path.join(args.out, INITIAL), arch=arch, num_classes=classes)
    summary = result.to_json()
    atomic_json({"config": config, "result": summary}, record_path)
    return summary, result.model


def _report(args, summary: dict, teacher, initial_accuracy, metrics, eval_data) -> list:
    from ..files import write_metrics
    from ..plots import plot_accuracy, plot_series
    from ..training import accuracy

    teacher_accuracy = None if eval_data is None else accuracy(teacher, *eval_data)
    final_accuracy = metrics[-1]["val_acc"] if metrics else initial_accuracy
    (macs0, macs1), (params0, params1) = summary["macs"], summary["params"]
    latency0, latency1 = summary["latency_ms"]
    rows = [{"model": "teacher", "macs": macs0, "params": params0, "latency_ms": latency0,
             "accuracy": teacher_accuracy},
            {"model": "pruned", "macs": macs1, "params": params1, "latency_ms": latency1,
             "accuracy": initial_accuracy}]
    if metrics:
        rows.append({"model": "fine-tuned", "macs": macs1, "params": params1,
                     "latency_ms": latency1, "accuracy": final_accuracy})
    write_metrics(rows, args.out, REPORT_FIELDS, stem="report")
    notes = []
    if eval_data is None:
        notes.append("no accuracy plot: no validation data (--eval-data)")
    else:
        try:
            series = {r["model"]: ([r["latency_ms"]], [100 * r["accuracy"]]) for r in rows}
            drawn = plot_series(series, os.path.join(args.out, "accuracy_latency.png"),
                                "latency (ms, measured)", "accuracy (%)",
                                title="pruning on synthesized images", kind="scatter")
            if drawn and metrics:
                plot_accuracy(metrics, os.path.join(args.out, "accuracy.png"))
            if not drawn:
                notes.append("no plots: pip install matplotlib")
        except Exception as error:  # noqa: BLE001 - a plot never fails a finished run
            notes.append(f"plot failed: {error}")
    for row in rows:
        acc = "" if row["accuracy"] is None else f"  accuracy {100 * row['accuracy']:.2f}%"
        print(f"{row['model']:>10}: {row['macs'] / 1e6:.2f} MMACs  {row['params'] / 1e3:.1f}K "
              f"params  {row['latency_ms']:.3f} ms{acc}")
    return notes


def _print_epoch(row: dict) -> None:
    accuracy = "" if row["val_acc"] is None else f"  val acc {100 * row['val_acc']:.2f}%"
    print(f"fine-tuning epoch {row['epoch']}: loss {row['train_loss']:.4f}{accuracy}", flush=True)


def run(args) -> dict:
    """Runs `dinv prune`; returns the pruning summary with the fine-tuning metrics."""
    from ..distill import distill_offline
    from ..model_utils import num_outputs, state_hash
    from ..prune import save_pruned
    from ..training import accuracy
    from .distill import eval_data_from_args

    targets, eta, arch = _check(args)
    teacher = teacher_from_args(args)
    eval_data = eval_data_from_args(args)
    pool, images, labels = _images(args, teacher)
    images, labels = images.to(args.device), labels.to(args.device)
    config = {"teacher_sha256": state_hash(teacher), "images": os.path.abspath(pool),
              "images_sha256": hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest(), "importance": args.importance, "steps": args.steps,
              "eta": eta, "seed": args.seed, "temperature": args.temperature,
              "latency_batch": args.latency_batch, "device": args.device, **targets}
    classes = num_outputs(teacher, tuple(images.shape[1:]))
    summary, model = _pruned(args, teacher, images, labels, config, targets, eta, arch, classes)
    initial_accuracy = None if eval_data is None else accuracy(model, *eval_data)
    metrics = []
    if args.finetune_epochs:
        metrics = distill_offline(teacher, model, (images, labels), args.finetune_epochs,
                                  checkpoint_dir=os.path.join(args.out, FINETUNE_DIR),
                                  resume=args.resume, eval_data=eval_data,
                                  on_epoch=_print_epoch, progress=True,
                                  batch_size=args.kd_batch_size, lr=args.kd_lr,
                                  T=args.temperature, seed=args.seed)
    path = os.path.join(args.out, FINAL)
    save_pruned(model, path, arch=arch, num_classes=classes,
                extra={"prune": summary, "finetune_epochs": args.finetune_epochs})
    # Nothing after the network is saved may fail the run.
    notes = _report(args, summary, teacher, initial_accuracy, metrics, eval_data)
    ratios = ", ".join(f"{name} {value:.3f}" for name, value in summary["ratios"].items())
    print(f"pruned: {path} (kept: {ratios}); report: {os.path.join(args.out, 'report.csv')}"
          + "".join(f" ({note})" for note in notes))
    return {**summary, "finetune": metrics}
