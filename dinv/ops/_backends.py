"""The backends that can run dinv's primitives, and the one rule that picks one per call.

A call is described by the primitive it runs (`OPS`: the forward primitive of docs/kernels.md; its
backward goes with it) and its arguments. Order (shared DESIGN "Dispatch"):
  CUDA tensor: cpp (the extension's CUDA kernels, when built with CUDA) -> triton -> reference
  CPU tensor:  cpp (the extension's CPU/OpenMP kernels) -> reference
While torch.compile traces, CPU tensors take the reference: Inductor then fuses the ops' torch
formulations with the neighbouring code, where the C++ kernels would stay opaque calls between
fused regions (digits net: 78 vs 113 ms/it, benchmarks/RESULTS.md). GPU tensors keep the kernels.
Triton runs CPU tensors only when forced and TRITON_INTERPRET=1 (how CI tests the kernels).
`DINV_BACKEND=reference|triton|cpp` (or `use_backend(...)`) forces one, also under torch.compile;
a forced backend that cannot take a call raises BackendUnavailable with every backend's reason
instead of falling back.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

NAMES = ("cpp", "triton", "reference")
# Each op the dispatcher chooses a backend for (a forward primitive) -> its backward primitive.
OPS = {
    "channel_stats": "channel_stats_backward",
    "bn_stats_forward": "bn_stats_backward",
    "image_prior_sums": "image_prior_backward",
    "js_rows": "js_rows_backward",
    "jsd_rows": "jsd_rows_backward",
    "kd_rows": "kd_rows_backward",
}
_DTYPES = {
    "cpp": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

_override = threading.local()
# Load results, filled on first use. Plain dict lookups (not functools caches or imports) so that
# torch.compile traces through dispatch without a graph break once a backend has been loaded.
_loaded: dict = {}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call."""


def _load(name, importer):
    """(loaded, reason_if_not) of backend `name`, importing it on first use."""
    if name not in _loaded:
        _loaded[name] = importer()
    return _loaded[name]


def _import_cpp():
    """Imports dinv._C (registers torch.ops.dinv.*) and records which primitives have kernels for
    which device: an extension built without CUDA, or from older sources than this package, lacks
    some."""
    try:
        importlib.import_module("dinv._C")
    except Exception as e:  # noqa: BLE001 - any load failure means "not available", with reason
        return False, f"extension dinv._C failed to load: {e}"
    from . import _native

    _native.register("dinv")
    _loaded["cpp_kernels"] = {
        (primitive, key)
        for op, backward in OPS.items() for primitive in (op, backward)
        for key in _DISPATCH_KEYS.values()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"dinv::{primitive}", key)}
    return True, None


def _import_triton():
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"triton is not importable: {e}"
    try:
        from . import _triton_ops

        _triton_ops.register()
    except Exception as e:  # noqa: BLE001
        return False, f"dinv.kernels failed to load: {e}"
    return True, None


def cpp_has_cuda() -> bool:
    """Whether dinv._C was built with its CUDA kernels."""
    return _load("cpp", _import_cpp)[0] and ("channel_stats", "CUDA") in _loaded["cpp_kernels"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced() -> str | None:
    name = getattr(_override, "name", None) or os.environ.get("DINV_BACKEND") or None
    if name is not None and name not in NAMES:
        raise ValueError(f"DINV_BACKEND={name!r}: expected one of {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force `name` (or lift forcing with None) within the block, for this thread."""
    if name is not None and name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(NAMES)}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def _check_op(op_name) -> None:
    if not isinstance(op_name, str) or op_name not in OPS:
        raise ValueError(f"unknown dinv op {op_name!r}: expected one of {', '.join(OPS)}")


def _device_reason(device, tensors) -> str | None:
    """Why no native backend takes these tensors' devices, or None. (The messages are built only
    on failure: the checks themselves are traced by torch.compile.)"""
    if any(t.device != device for t in tensors):
        return f"inputs on several devices ({', '.join(sorted({str(t.device) for t in tensors}))})"
    if device.type not in _DISPATCH_KEYS:
        return f"no kernels for device {device.type}"
    return None


def _dtype_reason(name, tensors) -> str | None:
    supported = _DTYPES[name]
    if all(t.dtype in supported for t in tensors if t.is_floating_point()):
        return None
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point()
                  and t.dtype not in supported})
    return f"unsupported dtype {', '.join(bad)} (takes {', '.join(map(str, supported))})"


def _cpp_reason(op_name, device) -> str | None:
    ok, reason = _load("cpp", _import_cpp)
    if not ok:
        return reason
    key = _DISPATCH_KEYS[device.type]
    if key == "CUDA" and not cpp_has_cuda():
        return "dinv._C was built without CUDA kernels"
    missing = [p for p in (op_name, OPS[op_name]) if (p, key) not in _loaded["cpp_kernels"]]
    if missing:
        return (f"dinv._C has no {key} kernel for {', '.join(missing)} (built from older "
                "sources: rebuild it)")
    return None


def _triton_reason(device, forced_here) -> str | None:
    ok, reason = _load("triton", _import_triton)
    if not ok:
        return reason
    if device.type == "cpu":
        if not triton_interpreting():
            return "CPU tensor (Triton runs CPU tensors only with TRITON_INTERPRET=1)"
        if not forced_here:
            return "CPU tensor (the Triton interpreter is for tests: force it to use it)"
    return None


def why_not(name: str, op_name: str, tensors, forced_here: bool = False) -> str | None:
    """None if backend `name` can run op `op_name` on these tensors, else the reason it cannot.
    `forced_here`: the caller forces `name` (Triton then takes CPU tensors under the
    interpreter)."""
    _check_op(op_name)
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(NAMES)}")
    if name == "reference":
        return None
    device = tensors[0].device
    reason = _device_reason(device, tensors)
    if reason is None:
        reason = _cpp_reason(op_name, device) if name == "cpp" else \
            _triton_reason(device, forced_here)
    return reason or _dtype_reason(name, tensors)


def _tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


def _compiling_on_cpu(tensors) -> bool:
    return not tensors[0].is_cuda and torch.compiler.is_compiling()


def _describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
                     for t in tensors)


def select(op_name: str, *args) -> str:
    """The backend that runs op `op_name` (a key of OPS) on these arguments (the tensors among
    them decide)."""
    _check_op(op_name)
    tensors = _tensors(args)
    name = forced()
    if name is not None:
        if why_not(name, op_name, tensors, forced_here=True) is not None:
            reasons = "; ".join(f"{backend}: {reason}"
                                for backend, reason in _reasons(op_name, tensors, name).items())
            raise BackendUnavailable(
                f"dinv backend {name!r} was forced but cannot run {op_name} on "
                f"[{_describe(tensors)}] ({reasons})")
        return name
    if _compiling_on_cpu(tensors):
        return "reference"
    order = ("cpp", "triton", "reference") if tensors[0].is_cuda else ("cpp", "reference")
    for candidate in order:
        if why_not(candidate, op_name, tensors) is None:
            return candidate
    raise AssertionError("the reference backend always runs")


def _reasons(op_name, tensors, forced_name) -> dict[str, str]:
    """Each backend -> why it cannot run the call, or 'available'."""
    return {name: why_not(name, op_name, tensors, forced_here=(name == forced_name))
            or "available" for name in NAMES}


def explain(op_name: str, *args) -> dict[str, str]:
    """For `dinv info` and debugging: each backend -> 'selected' / 'available (...)' / the reason
    it cannot run op `op_name` on these arguments."""
    tensors = _tensors(args)
    chosen = select(op_name, *args)
    compiling = forced() is None and _compiling_on_cpu(tensors)
    report = {}
    for name, reason in _reasons(op_name, tensors, forced()).items():
        if name == chosen:
            report[name] = "selected"
        elif reason == "available":
            report[name] = ("available (not under torch.compile on CPU: Inductor fuses the "
                            "reference)" if compiling else "available (lower priority)")
        else:
            report[name] = reason
    return report


def primitives(name: str):
    """The torch.ops namespace holding backend `name`'s primitives (autograd + fakes registered)."""
    if name == "cpp":
        return torch.ops.dinv
    if name == "triton":
        return torch.ops.dinv_triton
    raise ValueError(f"backend {name!r} has no primitive ops")
