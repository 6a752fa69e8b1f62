"""Which Adaptive DeepInversion competition term teaches the better student: DI (no competition)
against ADI with the reference's clamped formula and ADI with the Jensen-Shannon divergence, at
equal image budgets, on the shipped digits teacher, student accuracy on the real held-out digits.

    python benchmarks/competition.py                      # 200 and 600 images, seeds 0-2
    python benchmarks/competition.py --budgets 200 --seeds 0 --iterations 50   # a quick look

Every method synthesizes the same number of images with the same inversion settings and
iterations per batch (the digits preset), and the student (digits_student, fresh from the same
seed) trains for the same number of steps: DI distills on its pool (`distill_offline`); ADI
synthesizes its batches during the first half of the run against the student as it is then
(`distill_adaptive`) and trains on the growing pool. Writes CSV/JSON and a Markdown table to
benchmarks/results/competition-*.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dinv import Inverter, models
from dinv.data import synthesize_dataset
from dinv.datasets import load_digits
from dinv.distill import distill_adaptive, distill_offline
from dinv.files import atomic_csv, atomic_json
from dinv.presets import digits_settings

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
METHODS = ("di", "adi-reference", "adi-js")
KD = dict(batch_size=64, lr=0.05, T=4.0, augment=2)


def inverter(teacher, method: str, adi_scale: float) -> Inverter:
    settings = digits_settings()
    settings.pop("iterations")
    if method == "di":
        return Inverter(teacher, **settings)
    return Inverter(teacher, **settings, adi_scale=adi_scale,
                    competition=method.split("-", 1)[1])


def run_one(method, budget, seed, args, teacher, test):
    torch.manual_seed(seed)
    student = models.create("digits_student")
    inv = inverter(teacher, method, args.adi_scale)
    options = dict(KD, seed=seed)
    start = time.perf_counter()
    if method == "di":
        with tempfile.TemporaryDirectory() as pool:
            synthesize_dataset(inv, pool, budget, range(10), batch_size=args.synth_batch,
                               iterations=args.iterations, seed=seed, save_png=False)
            metrics = distill_offline(teacher, student, pool, args.epochs, eval_data=test,
                                      **options)
    else:
        steps = args.epochs * math.ceil(budget / KD["batch_size"])
        batches = math.ceil(budget / args.synth_batch)
        # The batches are spread over the first half of the run.
        synth_every = max(1, steps // (2 * batches))
        metrics = distill_adaptive(teacher, student, inv, budget, args.epochs,
                                   synth_every=synth_every, synth_batch_size=args.synth_batch,
                                   iterations=args.iterations, eval_data=test, **options)
    return {"method": method, "images": budget, "seed": seed,
            "accuracy": round(100 * metrics[-1]["val_acc"], 2),
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows, budgets) -> str:
    lines = ["| method | " + " | ".join(f"{b} images" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in METHODS:
        cells = []
        for budget in budgets:
            values = [r["accuracy"] for r in rows if r["method"] == method and r["images"] == budget]
            if not values:
                cells.append("—")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f} "
                         f"({', '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="200,600")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, default=200, help="inversion iterations per batch")
    p.add_argument("--synth-batch", type=int, default=50)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--adi-scale", type=float, default=1.0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    teacher, test = models.load_digits_teacher(), load_digits("test")
    rows = []
    for budget in budgets:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                rows.append(run_one(method, budget, seed, args, teacher, test))
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_csv(rows, args.out / "competition-digits.csv", list(rows[0]))
    atomic_json({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                args.out / "competition-digits.json")
    text = table(rows, budgets)
    (args.out / "competition-digits.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
