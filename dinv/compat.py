"""The reference `DeepInversionClass` interface on `dinv.Inverter`.

    from dinv import Inverter as DeepInversionClass    # the only line a user changes
    DeepInversionClass(bs=..., use_fp16=..., net_teacher=net, path=..., final_data_path=...,
                       parameters=..., setting_id=0, jitter=30, criterion=criterion,
                       coefficients=..., network_output_function=lambda x: x,
                       hook_for_display=None).generate_batch(net_student=None, targets=None)

Differences from the reference, all fixes: any batch size and target list (no multiple of 42),
CPU or CUDA, fp16 via torch.autocast (bf16 on CPU) instead of apex, the best image per target
is really kept, hooks are removed after every batch, and `generate_batch` returns the images.
`parameters` may also hold "iterations" (an int total or one count per stage) to override the
setting's iteration counts.
"""
from __future__ import annotations

import os
import random

import torch

from .imaging import IMAGENET_MEAN, IMAGENET_STD, save_grid, to_pil

REFERENCE_KWARGS = {"bs", "use_fp16", "net_teacher", "path", "final_data_path", "parameters",
                    "coefficients", "network_output_function", "hook_for_display"}
# The reference's preselected ImageNet classes ("good for ResNet50v1.5"), used when no targets
# are given and random_label is off.
PRESELECTED_CLASSES = [1, 933, 946, 980, 25, 63, 92, 94, 107, 985, 151, 154, 207, 250, 270, 277,
                       283, 292, 294, 309, 311, 325, 340, 360, 386, 402, 403, 409, 530, 440, 468,
                       417, 590, 670, 817, 762, 920, 949, 963, 967, 574, 487]
REFERENCE_PARAMETERS = dict(resolution=224, random_label=False, start_noise=True,
                            detach_student=False, do_flip=True, store_best_images=False)
SAVE_EVERY = 100


def init_reference(inv, teacher=None, setting_id=0, jitter=30, criterion=None, **kwargs):
    """Builds `inv` from the reference constructor's keyword arguments."""
    unknown = set(kwargs) - REFERENCE_KWARGS
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    net_teacher = kwargs.get("net_teacher", teacher)
    if net_teacher is None:
        raise TypeError("DeepInversionClass needs net_teacher")
    parameters = dict(REFERENCE_PARAMETERS)
    if "resolution" in kwargs.get("parameters", {}):
        parameters.update(kwargs["parameters"])
    coefficients = dict(kwargs.get("coefficients", {}))
    missing = {"r_feature", "first_bn_multiplier", "tv_l1", "tv_l2", "l2", "lr",
               "main_loss_multiplier", "adi_scale"} - set(coefficients)
    if missing:
        raise ValueError(f"coefficients is missing {sorted(missing)} (the reference needs all)")
    from .inverter import Inverter, model_device

    device = model_device(net_teacher)
    use_fp16 = bool(kwargs.get("use_fp16", False))
    amp_dtype = None
    if use_fp16:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    resolution = int(parameters["resolution"])
    output_function = kwargs.get("network_output_function")
    Inverter.__init__(
        inv, net_teacher, image_shape=(3, resolution, resolution), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, setting_id=setting_id, jitter=jitter, flip=parameters["do_flip"],
        detach_student=parameters["detach_student"], criterion=criterion,
        output_function=output_function, amp_dtype=amp_dtype, log_every=SAVE_EVERY,
        **{k: coefficients[k] for k in ("r_feature", "first_bn_multiplier", "tv_l1", "tv_l2",
                                        "l2", "lr", "main_loss_multiplier", "adi_scale")})
    inv.bs = int(kwargs.get("bs", 84))
    inv.random_label = parameters["random_label"]
    inv.store_best_images = parameters["store_best_images"]
    inv.prefix = kwargs.get("path", "./gen_images/")
    inv.final_data_path = kwargs.get("final_data_path", "/gen_images_final/")
    inv.hook_for_display = kwargs.get("hook_for_display")
    inv.num_generations = 0
    # A dinv extension of `parameters`: override the setting's iteration counts.
    inv.reference_iterations = parameters.get("iterations")
    os.makedirs(os.path.join(inv.prefix, "best_images"), exist_ok=True)
    os.makedirs(inv.final_data_path, exist_ok=True)


def default_targets(inv) -> torch.Tensor:
    if inv.random_label:
        return torch.tensor([random.randint(0, 999) for _ in range(inv.bs)])
    repeats = -(-inv.bs // len(PRESELECTED_CLASSES))
    return torch.tensor((PRESELECTED_CLASSES * repeats)[:inv.bs])


def generate_batch(inv, net_student=None, targets=None) -> torch.Tensor:
    targets = default_targets(inv) if targets is None else \
        torch.as_tensor(targets).flatten().long()

    def every_save(iteration, images, terms):
        save_grid(images, os.path.join(inv.prefix, "best_images",
                                       f"output_{iteration // SAVE_EVERY:05d}_gpu_0.png"),
                  inv.mean, inv.std)
        if inv.hook_for_display is not None:
            inv.hook_for_display(images, targets.to(images.device))

    images = inv.invert(targets, iterations=inv.reference_iterations, student=net_student,
                        callback=every_save)
    if inv.store_best_images:
        save_per_class(images, targets, inv.final_data_path, inv.num_generations, inv.mean,
                       inv.std)
    inv.num_generations += 1
    return images


def save_per_class(images, targets, root, generation, mean, std) -> None:
    """PNG per image under root/s{class:03d}/ (an ImageFolder layout)."""
    for index, (image, target) in enumerate(zip(to_pil(images, mean, std), targets.tolist())):
        folder = os.path.join(root, f"s{target:03d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"img_{generation:05d}_id{index:03d}.png"))
