"""`dinv invert`: synthesize a dataset from a teacher (resumable: run it again to continue).
Under `torchrun --nproc-per-node N -m dinv invert ...` the N processes share the batches and
write the dataset one process would."""
from __future__ import annotations

import os
import time

from .common import (UsageError, add_inversion_options, add_teacher_options, ints,
                     inverter_from_args, positive_int, teacher_from_args, torchrun_ranks)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("invert", help="synthesize a dataset from a teacher")
    add_teacher_options(p)
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=positive_int, required=True)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--classes", type=ints, help="comma-separated class indices (default: all)")
    p.add_argument("--no-png", action="store_true", help="tensor shards only")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a run of another configuration found in --out and start afresh")
    add_inversion_options(p)
    p.set_defaults(run=run)


def run(args) -> None:
    with torchrun_ranks(args) as ranks:
        manifest, seconds = _synthesize(args)
        if ranks.first:
            print(f"{len(manifest['completed'])} batches in {args.out} ({seconds:.0f} s); "
                  f"grid: {os.path.join(args.out, 'grid.png')}")


def _synthesize(args):
    from ..data import synthesize_dataset
    from ..model_utils import num_outputs

    teacher = teacher_from_args(args)
    inverter, iterations = inverter_from_args(args, teacher)
    count = num_outputs(teacher, inverter.image_shape)
    classes = args.classes or list(range(count))
    if min(classes) < 0 or max(classes) >= count:
        raise UsageError(f"--classes must be in 0..{count - 1} (the teacher has {count} outputs)")
    start = time.time()
    manifest = synthesize_dataset(inverter, args.out, args.num_images, classes,
                                  batch_size=args.batch_size, iterations=iterations,
                                  seed=args.seed, save_png=not args.no_png, progress=True,
                                  overwrite=args.overwrite)
    return manifest, time.time() - start
