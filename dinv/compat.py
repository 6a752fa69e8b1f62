"""The reference `DeepInversionClass` interface, translated into `dinv.Inverter` arguments.

    from dinv import Inverter as DeepInversionClass    # the only line a user changes
    DeepInversionClass(bs=..., use_fp16=..., net_teacher=net, path=..., final_data_path=...,
                       parameters=..., setting_id=0, jitter=30, criterion=criterion,
                       coefficients=..., network_output_function=lambda x: x,
                       hook_for_display=None).generate_batch(net_student=None, targets=None)

This module sits below the Inverter: `reference_arguments` turns the reference's keyword
arguments into the Inverter's own plus a `ReferenceOutput` (batch size, default targets, the
files the reference writes), and knows nothing of the Inverter itself. docs/reference.md lists
every deliberate difference from the reference.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from .imaging import IMAGENET_MEAN, IMAGENET_STD, save_grid, to_pil
from .distributed import current
from .model_utils import model_device

REFERENCE_KWARGS = ("bs", "use_fp16", "net_teacher", "path", "final_data_path", "parameters",
                    "coefficients", "network_output_function", "hook_for_display")
COEFFICIENTS = ("r_feature", "first_bn_multiplier", "tv_l1", "tv_l2", "l2", "lr",
                "main_loss_multiplier", "adi_scale")
# The reference's `parameters` and their defaults; "iterations" (an int total or one count per
# stage), "final_layout" and "seed" are dinv's additions.
REFERENCE_PARAMETERS = dict(resolution=224, random_label=False, start_noise=True,
                            detach_student=False, do_flip=True, store_best_images=False)
DINV_PARAMETERS = dict(iterations=None, final_layout="folders")
FINAL_LAYOUTS = ("folders", "flat")
# The reference's preselected ImageNet classes ("good for ResNet50v1.5"), used when no targets
# are given and random_label is off.
PRESELECTED_CLASSES = [1, 933, 946, 980, 25, 63, 92, 94, 107, 985, 151, 154, 207, 250, 270, 277,
                       283, 292, 294, 309, 311, 325, 340, 360, 386, 402, 403, 409, 530, 440, 468,
                       417, 590, 670, 817, 762, 920, 949, 963, 967, 574, 487]
SAVE_EVERY = 100
DEFAULT_PATH = "./gen_images/"
# The reference's default is "/gen_images_final/", a folder at the filesystem root; dinv's is
# relative to the working directory, and created only when images are stored.
DEFAULT_FINAL_DATA_PATH = "./gen_images_final/"

# Which Inverter arguments each reference argument decides.
DECIDES = {
    "net_teacher": ("teacher",),
    "use_fp16": ("amp_dtype",),
    "network_output_function": ("output_function",),
    "parameters": ("image_shape", "flip", "detach_student"),
    "coefficients": COEFFICIENTS,
}


@dataclass
class ReferenceOutput:
    """What `generate_batch` does besides inverting: the reference's batch size and default
    targets, and the files it writes (progress grids every 100 iterations under `path`, the final
    images under `final_data_path` when `store_best_images`)."""
    bs: int = 84
    random_label: bool = False
    store_best_images: bool = False
    path: str = DEFAULT_PATH
    final_data_path: str = DEFAULT_FINAL_DATA_PATH
    final_layout: str = "folders"
    hook_for_display: object = None
    iterations: object = None
    num_generations: int = 0

    def default_targets(self) -> torch.Tensor:
        """The reference's targets when none are given: random classes (from Python's global
        `random`, as the reference draws them), or the preselected classes repeated, cut to
        the batch size."""
        if self.random_label:
            return torch.tensor([random.randint(0, 999) for _ in range(self.bs)])
        repeats = -(-self.bs // len(PRESELECTED_CLASSES))
        return torch.tensor((PRESELECTED_CLASSES * repeats)[:self.bs])

    def progress_callback(self, targets, mean, std):
        """The reference's every-100-iterations grid of the current images (and the display
        hook's call)."""
        rank = current().rank

        def save(iteration, images, terms):
            save_grid(images, os.path.join(self.path, "best_images",
                                           f"output_{iteration // SAVE_EVERY:05d}_gpu_{rank}.png"),
                      mean, std)
            if self.hook_for_display is not None:
                self.hook_for_display(images, targets.to(images.device))
        return save

    def store(self, images, targets, mean, std) -> None:
        """The final images: dinv's ImageFolder layout (`s{class:03d}/img_{gen:05d}_id{i:03d}.png`)
        or the reference's flat names (`img_s{class:03d}_{gen:05d}_id{i:03d}_gpu_{rank}_2.jpg`)."""
        rank = current().rank
        for index, (image, target) in enumerate(zip(to_pil(images, mean, std), targets.tolist())):
            if self.final_layout == "flat":
                folder = self.final_data_path
                name = f"img_s{target:03d}_{self.num_generations:05d}_id{index:03d}_gpu_{rank}_2.jpg"
            else:
                folder = os.path.join(self.final_data_path, f"s{target:03d}")
                name = f"img_{self.num_generations:05d}_id{index:03d}.png"
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, name))


def reference_arguments(kwargs: dict) -> tuple[dict, set, ReferenceOutput]:
    """(Inverter keyword arguments, the names among them that the given reference arguments
    decide, the ReferenceOutput) from the reference constructor's keyword arguments."""
    unknown = set(kwargs) - set(REFERENCE_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    given = dict(kwargs.get("parameters") or {})
    extra = set(given) - set(REFERENCE_PARAMETERS) - set(DINV_PARAMETERS)
    if extra:
        raise ValueError(f"parameters has unknown keys {sorted(extra)}; the reference's are "
                         f"{sorted(REFERENCE_PARAMETERS)}, dinv adds {sorted(DINV_PARAMETERS)}")
    parameters = {**REFERENCE_PARAMETERS, **DINV_PARAMETERS, **given}
    if not parameters["start_noise"]:
        raise ValueError("parameters['start_noise']=False: the reference supports only starting "
                         "from noise (dinv: Inverter.invert(..., init=images))")
    if parameters["final_layout"] not in FINAL_LAYOUTS:
        raise ValueError(f"parameters['final_layout'] must be one of {FINAL_LAYOUTS}, got "
                         f"{parameters['final_layout']!r}")
    arguments = {"image_shape": (3, int(parameters["resolution"]), int(parameters["resolution"])),
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "flip": bool(parameters["do_flip"]),
                 "detach_student": bool(parameters["detach_student"]),
                 # The reference's competition term, whatever the modern default.
                 "competition": "reference", "log_every": SAVE_EVERY}
    if "net_teacher" in kwargs:
        arguments["teacher"] = kwargs["net_teacher"]
    if "coefficients" in kwargs:
        coefficients = dict(kwargs["coefficients"])
        missing = set(COEFFICIENTS) - set(coefficients)
        if missing:
            raise ValueError(f"coefficients is missing {sorted(missing)} (the reference needs "
                             "all of them)")
        arguments.update({k: coefficients[k] for k in COEFFICIENTS})
    if kwargs.get("use_fp16"):
        teacher = arguments.get("teacher")
        on_cuda = teacher is not None and model_device(teacher).type == "cuda"
        # fp16 autocast on CUDA (the reference's apex O2); the CPU autocasts to bf16.
        arguments["amp_dtype"] = torch.float16 if on_cuda else torch.bfloat16
    if "network_output_function" in kwargs:
        arguments["output_function"] = kwargs["network_output_function"]
    decided = {name for key in kwargs for name in DECIDES.get(key, ())}
    output = ReferenceOutput(
        bs=int(kwargs.get("bs", 84)), random_label=bool(parameters["random_label"]),
        store_best_images=bool(parameters["store_best_images"]),
        path=kwargs.get("path", DEFAULT_PATH),
        final_data_path=kwargs.get("final_data_path") or DEFAULT_FINAL_DATA_PATH,
        final_layout=parameters["final_layout"], hook_for_display=kwargs.get("hook_for_display"),
        iterations=parameters["iterations"])
    if output.bs < 1:
        raise ValueError(f"bs must be >= 1, got {output.bs}")
    return arguments, decided, output
