"""The Triton kernels (dinv.kernels) as torch ops in the namespace `dinv_triton`.

Same schemas as the C++ library (csrc/ops.cpp; a test keeps the two in sync), so the fake kernels
and autograd of `_native.register` serve both, and torch.compile sees opaque ops with known
shapes instead of tracing into Triton launch code.
"""
from __future__ import annotations

import functools

import torch

_ROWS_SCHEMA = "(Tensor student_logits, Tensor teacher_logits, float T) -> Tensor"
_ROWS_BACKWARD_SCHEMA = ("(Tensor grad_rows, Tensor student_logits, Tensor teacher_logits, "
                         "float T, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)")
SCHEMAS = {
    "channel_stats": "(Tensor x) -> (Tensor, Tensor)",
    "channel_stats_backward": "(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor",
    "bn_stats_forward": "(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
                        "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)",
    "bn_stats_backward": "(Tensor grad_y, Tensor x, Tensor mean, Tensor grad_mean, "
                         "Tensor grad_var, Tensor? weight, Tensor running_var, float eps) -> Tensor",
    "image_prior_sums": "(Tensor x) -> (Tensor, Tensor)",
    "image_prior_backward": "(Tensor x, Tensor tv_coef, Tensor sq_coef) -> Tensor",
    "js_rows": _ROWS_SCHEMA,
    "js_rows_backward": _ROWS_BACKWARD_SCHEMA,
    "jsd_rows": _ROWS_SCHEMA,
    "jsd_rows_backward": _ROWS_BACKWARD_SCHEMA,
    "kd_rows": _ROWS_SCHEMA,
    "kd_rows_backward": _ROWS_BACKWARD_SCHEMA,
}
_MODULE_OF = {
    "channel_stats": "bn_stat", "channel_stats_backward": "bn_stat",
    "bn_stats_forward": "bn_stat", "bn_stats_backward": "bn_stat",
    "image_prior_sums": "image_prior", "image_prior_backward": "image_prior",
    "js_rows": "js", "js_rows_backward": "js", "jsd_rows": "js", "jsd_rows_backward": "js",
    "kd_rows": "kd", "kd_rows_backward": "kd",
}

_library = None


def _on_input_device(kernel):
    """Triton launches on the current CUDA device's stream; ops registered from Python get no
    device guard (the C++ ops take one from their input), so take it here: a model on cuda:1
    while cuda:0 is current must not launch on the wrong GPU."""
    @functools.wraps(kernel)
    def guarded(first, *args):
        with torch.cuda.device(first.device):
            return kernel(first, *args)
    return guarded


def register() -> None:
    global _library
    if _library is not None:
        return
    import importlib

    from . import _native

    library = torch.library.Library("dinv_triton", "DEF")
    for name, schema in SCHEMAS.items():
        # The kernels read any strides, as the C++ ops (tagged the same in csrc/ops.cpp).
        library.define(name + schema, tags=(torch.Tag.flexible_layout,))
        kernel = getattr(importlib.import_module(f"dinv.kernels.{_MODULE_OF[name]}"), name)
        # CPU only matters under TRITON_INTERPRET=1; the dispatcher never sends CPU tensors here
        # otherwise.
        library.impl(name, _on_input_device(kernel), "CUDA")
        library.impl(name, kernel, "CPU")
    _library = library
    _native.register("dinv_triton")
