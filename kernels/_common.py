"""Argument checks and dtype rules shared by the Triton launch functions."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(condition, message):
    """The C++ ops report user errors with TORCH_CHECK (a RuntimeError); raise the same type so
    callers see one error type whichever backend runs."""
    if not condition:
        raise RuntimeError(message)


def check_float(tensor, name):
    check(tensor.dtype in FLOAT_DTYPES, f"{name}: unsupported dtype {tensor.dtype}")


def check_device(reference, **tensors):
    for name, tensor in tensors.items():
        check(tensor.device == reference.device,
              f"{name} is on {tensor.device}, expected {reference.device}")


def check_channel_vector(tensor, channels, name):
    check(tensor.shape == (channels,),
          f"{name} must have shape ({channels},), got {tuple(tensor.shape)}")


def acc_dtype(dtype):
    """Accumulation dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spatial_size(x):
    """S of the [N, C, S] view of an (N, C, *) tensor."""
    return math.prod(x.shape[2:])
