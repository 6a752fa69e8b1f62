"""What the op tests share: the backends available here, and the parity rule."""
from __future__ import annotations

import pytest
import torch

from dinv.ops import _backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_params(device="cpu", op="channel_stats"):
    """pytest params for every native backend, skipped with the reason when it cannot run `op`
    on fp32 tensors of `device`."""
    x = torch.empty(0, device=device) if device == "cpu" or torch.cuda.is_available() else None
    params = []
    for name in ("cpp", "triton"):
        reason = "no CUDA device" if x is None else _backends.why_not(name, op, [x],
                                                                      forced_here=True)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        params.append(pytest.param(name, marks=marks, id=f"{name}-{device}"))
    return params


def max_error(value, truth):
    if isinstance(value, (tuple, list)):
        return max(max_error(v, t) for v, t in zip(value, truth))
    if value is None:
        return 0.0
    return (value.double() - truth.double()).abs().max().item() if value.numel() else 0.0


def scale(truth):
    if isinstance(truth, (tuple, list)):
        return max(scale(t) for t in truth)
    return truth.double().abs().max().item() if truth.numel() else 0.0


def assert_no_worse_than_reference(value, reference, truth, factor=4.0, rtol=1e-6):
    """The rule for every dtype, tensor by tensor: the backend's error against an fp64
    computation on the same (rounded) inputs is at most `factor` × the reference's own error,
    plus `rtol` × the size of the values (the fp32 accumulation-order floor), plus — for fp16 /
    bf16 outputs — one unit of the output dtype's precision at that size: both round once on
    store, and fp32 values that differ in accumulation order can round to neighbouring values."""
    if isinstance(value, (tuple, list)):
        for v, r, t in zip(value, reference, truth):
            assert_no_worse_than_reference(v, r, t, factor, rtol)
        return
    if value is None:
        return
    err_backend = max_error(value, truth)
    err_reference = max_error(reference, truth)
    precision = torch.finfo(value.dtype).eps if value.dtype in (torch.float16,
                                                                 torch.bfloat16) else 0.0
    bound = factor * err_reference + (rtol + precision) * max(scale(truth), 1e-30)
    assert err_backend <= bound, (
        f"{value.dtype} backend error {err_backend:.3e} > {factor} x reference error "
        f"{err_reference:.3e} + ({rtol} + {precision}) x scale {scale(truth):.3e}")
