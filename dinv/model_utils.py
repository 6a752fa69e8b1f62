"""Helpers every part of dinv uses on the models it is given: freezing a model for the length of
a block and restoring it exactly, where a model lives, how many classes it predicts, and a hash
that identifies its weights."""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn


@contextlib.contextmanager
def frozen(*models):
    """Eval mode and no parameter gradients inside; each model's mode and requires_grad flags
    are restored exactly afterwards (None entries are skipped)."""
    saved = []
    for model in models:
        if model is None:
            continue
        saved.append(([(m, m.training) for m in model.modules()],
                      [(p, p.requires_grad) for p in model.parameters()]))
        model.eval()
        model.requires_grad_(False)
    try:
        yield
    finally:
        for modes, flags in saved:
            for m, training in modes:
                m.training = training
            for p, flag in flags:
                p.requires_grad_(flag)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter or buffer (fp32 for none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def num_outputs(model: nn.Module, image_shape, output_function=None) -> int:
    """How many classes `model` predicts, from one forward of two blank images of `image_shape`
    (C, H, W) in eval mode; the model's modes and flags are left as they were."""
    x = torch.zeros((2,) + tuple(image_shape), device=model_device(model),
                    dtype=model_dtype(model))
    with torch.no_grad(), frozen(model):
        out = model(x)
    if output_function is not None:
        out = output_function(out)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"{type(model).__name__} returned {describe_output(out)}; expected "
                         "class logits [N, classes] (pass output_function to extract them)")
    return int(out.shape[1])


def describe_output(out) -> str:
    """A short description of what a model returned, for error messages."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names, dtypes, shapes and values, in order): two models
    with the same hash compute the same function (for the same class)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{shape};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def input_channels(model: nn.Module) -> int | None:
    """The channel count the model's first convolution (or first linear layer, for an MLP)
    expects, or None when it has neither: what `--image-shape` must start with."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return None
    return None
