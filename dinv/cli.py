"""The `dinv` command: `dinv info`, `dinv demo`, `dinv invert`, `dinv distill`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def load_teacher(spec: str, arch: str | None = None, num_classes: int | None = None):
    """A teacher from the command line: "digits" (the shipped demo teacher), a registry name with
    `--arch` and a state_dict file, or a file holding a whole pickled model."""
    from . import models

    if spec == "digits":
        return models.load_digits_teacher()
    if arch is not None:
        model = models.create(arch, **({"num_classes": num_classes} if num_classes else {}))
        state = torch.load(spec, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model.eval()
    if os.path.exists(spec):
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"{spec} holds a {type(model).__name__}, not a model: give --arch "
                             "to load it as a state_dict")
        return model.eval()
    raise SystemExit(f"--teacher {spec!r}: not 'digits' and not an existing file")


# -- dinv info ----------------------------------------------------------------------------------
def cmd_info(args):
    from .info import describe

    print(describe())


# -- dinv invert --------------------------------------------------------------------------------
def add_inversion_options(p):
    p.add_argument("--image-shape", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="C,H,W (default: 1,16,16 for digits, 3,32,32 for *_cifar archs, "
                   "else 3,224,224)")
    p.add_argument("--mean", type=_floats, help="normalization mean per channel "
                   "(default: digits' or ImageNet's)")
    p.add_argument("--std", type=_floats, help="normalization std per channel")
    p.add_argument("--setting", type=int, default=None, help="0, 1 or 2 (reference settings)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--r-feature", type=float, default=None)
    p.add_argument("--first-bn-multiplier", type=float, default=None)
    p.add_argument("--tv-l2", type=float, default=None)
    p.add_argument("--tv-l1", type=float, default=None)
    p.add_argument("--l2", type=float, default=None)
    p.add_argument("--jitter", type=int, default=None)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (a prior about the domain: off for digits)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def inverter_from_args(args, teacher, **settings_overrides):
    """The Inverter of the command line: the preset of --teacher/--arch, then the flags given,
    then `settings_overrides` (e.g. adi_scale); returns it and the iteration count."""
    from .inverter import Inverter
    from .presets import inversion_settings

    settings = inversion_settings(args.teacher, getattr(args, "arch", None))
    overrides = {"image_shape": args.image_shape, "mean": args.mean, "std": args.std,
                 "setting_id": args.setting, "lr": args.lr, "r_feature": args.r_feature,
                 "first_bn_multiplier": args.first_bn_multiplier, "tv_l2": args.tv_l2,
                 "tv_l1": args.tv_l1, "l2": args.l2, "jitter": args.jitter, "flip": args.flip}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(settings_overrides)
    iterations = args.iterations if args.iterations is not None else settings.pop("iterations")
    settings.pop("iterations", None)
    if args.amp:
        settings["amp_dtype"] = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return Inverter(teacher.to(args.device), **settings), iterations


def cmd_invert(args):
    from .data import synthesize_dataset

    teacher = load_teacher(args.teacher, args.arch, args.num_classes)
    inverter, iterations = inverter_from_args(args, teacher)
    classes = args.classes or list(range(num_outputs(teacher, inverter)))
    start = time.time()
    manifest = synthesize_dataset(inverter, args.out, args.num_images, classes,
                                  batch_size=args.batch_size, iterations=iterations,
                                  seed=args.seed, save_png=not args.no_png, progress=True)
    print(f"{len(manifest['completed'])} batches in {args.out} ({time.time() - start:.0f} s); "
          f"grid: {os.path.join(args.out, 'grid.png')}")


def num_outputs(teacher, inverter):
    """How many classes the teacher predicts, from one forward of two blank images."""
    with torch.no_grad():
        return teacher.eval()(torch.zeros((2,) + inverter.image_shape,
                                          device=inverter.device)).shape[1]


# -- dinv demo ----------------------------------------------------------------------------------
def cmd_demo(args):
    from .demo import run_demo

    result = run_demo(args.out, per_class=args.per_class, iterations=args.iterations,
                      seed=args.seed, progress=not args.quiet)
    print(json.dumps(result, indent=1))


# -- dinv distill -------------------------------------------------------------------------------
def cmd_distill(args):
    from .distill import main_from_args

    main_from_args(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="dinv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="backends built and available here").set_defaults(fn=cmd_info)

    demo = sub.add_parser("demo", help="end to end on the bundled digits: teacher -> images")
    demo.add_argument("--out", default="dinv-demo")
    demo.add_argument("--per-class", type=int, default=20)
    demo.add_argument("--iterations", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(fn=cmd_demo)

    invert = sub.add_parser("invert", help="synthesize a dataset from a teacher")
    invert.add_argument("--teacher", required=True,
                        help="'digits', a state_dict file with --arch, or a pickled model file")
    invert.add_argument("--arch", help="dinv.models name for a state_dict teacher")
    invert.add_argument("--num-classes", type=int)
    invert.add_argument("--out", required=True)
    invert.add_argument("--num-images", type=int, required=True)
    invert.add_argument("--batch-size", type=int, default=64)
    invert.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")])
    invert.add_argument("--no-png", action="store_true", help="tensor shards only")
    add_inversion_options(invert)
    invert.set_defaults(fn=cmd_invert)

    from .distill import add_distill_parser

    add_distill_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
