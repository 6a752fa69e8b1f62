"""Data-free pruning (dinv.prune): what each criterion keeps at 30/50/70 % of the MACs.

    PYTHONPATH=. python benchmarks/prune.py --threads 1  # ~5 min on a CPU core (+1 min the
                                                         # first time, to synthesize the images)
    PYTHONPATH=. python benchmarks/prune.py --quick      # ~2 min: 200 images, 10 epochs

digits: the shipped teacher (99.3 % on the 450 real test digits) is pruned to each MACs ratio by
    taylor/synthesized   Taylor importance on DeepInversion images (the paper's method)
    taylor/noise         Taylor importance on Gaussian noise images (the paper's baseline)
    magnitude            group L2 norm of the weights (no data)
    random               seeded random scores
    hardware-aware       taylor/synthesized ranked with η = 1 against a latency table measured
                         on this device (same MACs target)
then fine-tuned by KD from the unpruned teacher on the same images (noise for taylor/noise).
Reported: MACs and parameters (kept fraction), latency measured end to end at --latency-batch
(median of repeated runs) and by the latency table, real test accuracy before and after
fine-tuning, seconds.
resnet18_cifar (random weights; structure and latency only): the same criteria on noise images,
no accuracy.

Writes prune-<device>[-quick].{csv,json} and a PNG per workload to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness
from benchmarks.harness import DEFAULT_OUT

METHODS = {  # name: (importance, pruning and fine-tuning images, eta)
    "taylor/synthesized": ("taylor", "synthesized", 0.0),
    "taylor/noise": ("taylor", "noise", 0.0),
    "magnitude": ("magnitude", "synthesized", 0.0),
    "random": ("random", "synthesized", 0.0),
    "hardware-aware": ("taylor", "synthesized", 1.0),
}
RESNET_METHODS = ("taylor/noise", "magnitude", "random", "hardware-aware")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 images, 10 epochs")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="MACs fractions kept")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--images", type=int, default=None, help="DI images (default 600; quick 200)")
    p.add_argument("--iterations", type=int, default=100, help="inversion iterations per batch")
    p.add_argument("--epochs", type=int, default=None, help="KD epochs (default 30; quick 10)")
    p.add_argument("--latency-batch", type=int, default=64, help="digits latency batch")
    p.add_argument("--resnet-images", type=int, default=16)
    p.add_argument("--resnet-batch", type=int, default=8, help="resnet18_cifar latency batch")
    p.add_argument("--no-resnet", action="store_true")
    p.add_argument("--pool", default=None, help="synthesized images cache (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="file stem (default prune-<device>[-quick])")
    return p.parse_args(argv)


def synthesized_pool(args, teacher, count):
    from dinv import Inverter
    from dinv.data import synthesize_dataset
    from dinv.presets import digits_settings

    folder = Path(args.pool) if args.pool else \
        Path(tempfile.gettempdir()) / f"dinv-bench-prune-{count}-{args.iterations}-{args.seed}"
    settings = digits_settings()
    settings.pop("iterations")
    synthesize_dataset(Inverter(teacher, **settings), folder, count, range(10),
                       batch_size=100, iterations=args.iterations, seed=args.seed,
                       save_png=False, progress=True)
    return folder


def measure(workload, method, ratio, model, images, targets, example, table, args, eval_data,
            epochs, log) -> dict:
    """One row: prune `model` by `method` to `ratio` of its MACs (and fine-tune with
    `eval_data`)."""
    from dinv.distill import distill_offline
    from dinv.prune import prune
    from dinv.training import accuracy

    importance, _, eta = METHODS[method]
    start = time.perf_counter()
    result = prune(model, images, targets=targets, example_inputs=example, macs_ratio=ratio,
                   importance=importance, latency_table=table, eta=eta, seed=args.seed,
                   batch_size=64)
    row = {"workload": workload, "method": method, "macs_target": ratio,
           "macs": result.macs[1], "macs_kept": result.ratios()["macs"],
           "params": result.params[1], "params_kept": result.ratios()["params"],
           "latency_ms": result.latency[1], "unpruned_latency_ms": result.latency[0],
           "latency_kept": result.ratios()["latency"],
           "table_latency_kept": result.ratios().get("table_latency"),
           "prune_s": round(time.perf_counter() - start, 2)}
    if eval_data is not None:
        row["acc_pruned"] = accuracy(result.model, *eval_data)
        start = time.perf_counter()
        metrics = distill_offline(model, result.model, images, epochs, seed=args.seed)
        row["acc_finetuned"] = accuracy(result.model, *eval_data)
        row["finetune_s"] = round(time.perf_counter() - start, 2)
        row["finetune_loss"] = metrics[-1]["train_loss"]
    log("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()))
    return row


def baseline_row(workload, model, example, rows, eval_data) -> dict:
    """The unpruned network; its latency is the median of the measurements each pruned one was
    measured against (interleaved with it)."""
    from dinv.prune import count_macs, count_params
    from dinv.training import accuracy

    row = {"workload": workload, "method": "unpruned", "macs_target": 1.0,
           "macs": count_macs(model, example), "macs_kept": 1.0,
           "params": count_params(model), "params_kept": 1.0,
           "latency_ms": statistics.median(r["unpruned_latency_ms"] for r in rows),
           "latency_kept": 1.0, "table_latency_kept": 1.0}
    if eval_data is not None:
        row["acc_pruned"] = row["acc_finetuned"] = accuracy(model, *eval_data)
    return row


def digits_rows(args, ratios, methods, log) -> list:
    from dinv.data import load_shards
    from dinv.datasets import load_digits
    from dinv.models import load_digits_teacher
    from dinv.prune import LatencyTable

    teacher = load_digits_teacher()
    count = args.images or (200 if args.quick else 600)
    epochs = args.epochs or (10 if args.quick else 30)
    log(f"# digits: {count} DI images ({args.iterations} iterations), KD {epochs} epochs")
    synthesized, labels = load_shards(synthesized_pool(args, teacher, count))
    noise = torch.randn(synthesized.shape, generator=torch.Generator().manual_seed(args.seed))
    sources = {"synthesized": (synthesized, labels), "noise": (noise, None)}
    example = synthesized[:args.latency_batch]
    table = LatencyTable.measure(teacher, example, progress=True)
    eval_data = load_digits("test")
    rows = []
    for method in methods:
        images, targets = sources[METHODS[method][1]]
        for ratio in ratios:
            rows.append(measure("digits", method, ratio, teacher, images, targets, example,
                                table, args, eval_data, epochs, log))
    return [baseline_row("digits", teacher, example, rows, eval_data)] + rows


def resnet_rows(args, ratios, methods, log) -> list:
    from dinv import models
    from dinv.prune import LatencyTable

    torch.manual_seed(args.seed)
    model = models.create("resnet18_cifar").eval()
    images = torch.randn((args.resnet_images, 3, 32, 32),
                         generator=torch.Generator().manual_seed(args.seed))
    example = images[:1].repeat(args.resnet_batch, 1, 1, 1)
    log(f"# resnet18_cifar (random weights): {args.resnet_images} noise images, latency batch "
        f"{args.resnet_batch}")
    table = LatencyTable.measure(model, example, points=6, repeats=5, progress=True)
    rows = [measure("resnet18_cifar", method, ratio, model, images, None, example, table, args,
                    None, 0, log)
            for method in methods if method in RESNET_METHODS for ratio in ratios]
    return [baseline_row("resnet18_cifar", model, example, rows, None)] + rows


def plot(rows, workload, y, ylabel, path) -> bool:
    from dinv.plots import plot_series

    series = {}
    for row in rows:
        if row["workload"] == workload and row["method"] != "unpruned" and row.get(y) is not None:
            xs, ys = series.setdefault(row["method"], ([], []))
            xs.append(100 * row["macs_kept"])
            ys.append(100 * row[y])
    return plot_series(series, path, "MACs kept (%)", ylabel, title=workload)


def main(argv=None, log=print):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    meta = harness.machine_info("cpu")
    log(f"# dinv pruning benchmark  {meta['date']}  torch {meta['torch']}  ({meta['cpu']}, "
        f"{meta['threads']} threads)")
    rows = digits_rows(args, ratios, methods, log)
    if not args.no_resnet:
        rows += resnet_rows(args, ratios, methods, log)
    stem = args.name or "prune-cpu" + ("-quick" if args.quick else "")
    out = Path(args.out)
    paths = harness.write_rows(out, stem, rows, {**meta, **vars(args)})
    paths["digits_png"] = out / f"{stem}-digits.png"
    plot(rows, "digits", "acc_finetuned", "real test accuracy after KD fine-tuning (%)",
         paths["digits_png"])
    if not args.no_resnet:
        paths["resnet_png"] = out / f"{stem}-resnet18.png"
        plot(rows, "resnet18_cifar", "latency_kept", "measured latency kept (%)",
             paths["resnet_png"])
    log(table(rows))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows, paths


def table(rows) -> str:
    """A markdown table of the rows."""
    def cell(row, key, scale=100, spec=".1f"):
        value = row.get(key)
        return "" if value is None else f"{scale * value:{spec}}"
    lines = ["| workload | method | MACs kept % | params kept % | latency ms (kept %) | table "
             "latency kept % | acc pruned % | acc fine-tuned % |", "|---" * 8 + "|"]
    for row in rows:
        lines.append(f"| {row['workload']} | {row['method']} | {cell(row, 'macs_kept')} | "
                     f"{cell(row, 'params_kept')} | {row['latency_ms']:.3f} "
                     f"({cell(row, 'latency_kept', spec='.0f')}) | "
                     f"{cell(row, 'table_latency_kept')} | {cell(row, 'acc_pruned')} | "
                     f"{cell(row, 'acc_finetuned')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
