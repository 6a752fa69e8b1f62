"""What several `dinv` subcommands share: the parser that reports errors on one line, the teacher
and inversion options (declared once), and building the teacher and the Inverter from them."""
from __future__ import annotations

import argparse
import contextlib
import math

import torch


class UsageError(Exception):
    """A bad combination of arguments found after parsing: reported like argparse's own errors
    (one line, exit status 2), before any work is done."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line ("dinv invert: error: ...") and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def ints(text: str) -> list:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def image_shape(text: str) -> tuple:
    values = ints(text)
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive integers), got {text!r}")
    return tuple(values)


# -- the processes --------------------------------------------------------------------------------
@contextlib.contextmanager
def torchrun_ranks(args):
    """For the command's length: under `torchrun`, this process in the default process group
    (gloo on CPU, NCCL on GPU; `--device cuda` becomes this process's cuda:LOCAL_RANK). Yields
    the Ranks (one process without torchrun); rank 0 is the one that prints."""
    from ..distributed import current, torchrun_session

    with torchrun_session(args.device) as device:
        args.device = device
        yield current()


# -- the teacher --------------------------------------------------------------------------------
def add_teacher_options(p, name: str = "--teacher", required: bool = True) -> None:
    p.add_argument(name, required=required,
                   help="'digits' (the shipped teacher), a state_dict file with --arch, or a "
                        "pickled model file with --trust-pickle")
    p.add_argument("--arch", help="architecture of a state_dict file: a dinv.models name "
                   "(e.g. resnet34_cifar), torchvision:<name> or timm:<name>")
    p.add_argument("--num-classes", type=positive_int)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled model: unpickling runs any code the file "
                        "contains, so only for files you trust (a state_dict + --arch never does)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def teacher_from_args(args, spec: str | None = None):
    """The teacher of the command line, in eval mode on --device."""
    from ..models import load_teacher

    spec = args.teacher if spec is None else spec
    model = load_teacher(spec, arch=args.arch, num_classes=args.num_classes,
                         trust_pickle=args.trust_pickle)
    return model.to(args.device)


# -- the inversion ------------------------------------------------------------------------------
def add_inversion_options(p) -> None:
    g = p.add_argument_group("inversion (defaults: the preset of --teacher/--arch)")
    g.add_argument("--image-shape", type=image_shape,
                   help="C,H,W (default: 1,16,16 for digits, 3,32,32 for *_cifar archs, "
                        "else 3,224,224)")
    g.add_argument("--mean", type=floats, help="normalization mean per channel "
                   "(default: digits' or ImageNet's)")
    g.add_argument("--std", type=floats, help="normalization std per channel")
    g.add_argument("--setting", type=int, choices=[0, 1, 2], default=None,
                   help="the reference's settings (0: half then full resolution, 1: full, 2: 20k)")
    g.add_argument("--iterations", type=positive_int, default=None)
    g.add_argument("--lr", type=positive_float, default=None)
    g.add_argument("--r-feature", type=nonnegative_float, default=None)
    g.add_argument("--first-bn-multiplier", type=nonnegative_float, default=None)
    g.add_argument("--tv-l2", type=nonnegative_float, default=None)
    g.add_argument("--tv-l1", type=nonnegative_float, default=None)
    g.add_argument("--l2", type=nonnegative_float, default=None)
    g.add_argument("--jitter", type=nonnegative_int, default=None)
    g.add_argument("--jitter-mode", choices=["roll", "shift"], default=None,
                   help="roll: circular shift (the reference's); shift: pad with the background")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (a prior about the domain: off for digits)")
    g.add_argument("--competition", choices=["js", "reference"], default=None,
                   help="ADI's competition term: the Jensen-Shannon divergence, or the "
                        "reference code's clamped formula")
    g.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    g.add_argument("--seed", type=int, default=0)


FLAG_SETTINGS = {"image_shape": "image_shape", "mean": "mean", "std": "std",
                 "setting": "setting_id", "lr": "lr", "r_feature": "r_feature",
                 "first_bn_multiplier": "first_bn_multiplier", "tv_l2": "tv_l2",
                 "tv_l1": "tv_l1", "l2": "l2", "jitter": "jitter", "jitter_mode": "jitter_mode",
                 "flip": "flip", "competition": "competition"}


def inverter_settings(args, teacher, **overrides) -> tuple[dict, object]:
    """(Inverter keyword arguments, iterations): the preset of --teacher/--arch, then the flags
    given, then `overrides` (e.g. adi_scale)."""
    from ..model_utils import input_channels
    from ..presets import inversion_settings

    settings = inversion_settings(args.teacher, getattr(args, "arch", None))
    settings.update({setting: getattr(args, flag) for flag, setting in FLAG_SETTINGS.items()
                     if getattr(args, flag, None) is not None})
    settings.update(overrides)
    iterations = args.iterations if args.iterations is not None else settings.pop("iterations")
    settings.pop("iterations", None)
    if args.amp:
        settings["amp_dtype"] = torch.bfloat16 if args.amp == "bf16" else torch.float16
    channels = input_channels(teacher)
    if args.image_shape is None and channels is not None and \
            channels != settings["image_shape"][0]:
        raise UsageError(f"the teacher's first layer takes {channels}-channel images but the "
                         f"preset is {settings['image_shape']}: pass --image-shape "
                         f"{channels},H,W (and --mean/--std with {channels} values)")
    channel_count = settings["image_shape"][0]
    for name in ("mean", "std"):
        if len(settings[name]) != channel_count:
            raise UsageError(f"--{name} needs {channel_count} values (one per channel of "
                             f"{tuple(settings['image_shape'])}), got {settings[name]}")
    return settings, iterations


def inverter_from_args(args, teacher, **overrides):
    """The Inverter of the command line and its iteration count; bad values are usage errors."""
    from ..inverter import Inverter

    settings, iterations = inverter_settings(args, teacher, **overrides)
    try:
        return Inverter(teacher, **settings), iterations
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error
