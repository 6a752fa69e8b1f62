"""The backends that can run dinv's primitives, and the one rule that picks one per call.

Order (docs/kernels.md, shared DESIGN "Dispatch"):
  CUDA tensor: cpp (the extension's CUDA kernels, when built with CUDA) -> triton -> reference
  CPU tensor:  cpp (the extension's CPU/OpenMP kernels) -> reference
Triton runs CPU tensors only when forced and TRITON_INTERPRET=1 (how CI tests the kernels).
`DINV_BACKEND=reference|triton|cpp` (or `use_backend(...)`) forces one; a forced backend that
cannot take a call raises with the reason instead of falling back.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

NAMES = ("cpp", "triton", "reference")
_CPP_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_override = threading.local()
# Load results, filled on first use. Plain dict lookups (not functools caches or imports) so that
# torch.compile traces through dispatch without a graph break once a backend has been loaded.
_loaded: dict = {}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call."""


def _load_cpp():
    """Imports dinv._C (registers torch.ops.dinv.*). Returns (loaded, reason_if_not)."""
    if "cpp" not in _loaded:
        _loaded["cpp"] = _import_cpp()
    return _loaded["cpp"]


def _import_cpp():
    try:
        importlib.import_module("dinv._C")
    except Exception as e:  # noqa: BLE001 - any load failure means "not available", with reason
        return False, f"extension dinv._C failed to load: {e}"
    from . import _native

    _native.register("dinv")
    return True, None


def cpp_has_cuda() -> bool:
    if "cpp_cuda" not in _loaded:
        _loaded["cpp_cuda"] = _load_cpp()[0] and torch._C._dispatch_has_kernel_for_dispatch_key(
            "dinv::channel_stats", "CUDA")
    return _loaded["cpp_cuda"]


def _load_triton():
    if "triton" not in _loaded:
        _loaded["triton"] = _import_triton()
    return _loaded["triton"]


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


def why_not(name: str, tensors, forced_here: bool = False) -> str | None:
    """None if backend `name` can run on these tensors, else the reason it cannot."""
    if name == "reference":
        return None
    device = tensors[0].device
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if name == "cpp":
        ok, reason = _load_cpp()
        if not ok:
            return reason
        if device.type == "cuda" and not cpp_has_cuda():
            return "dinv._C was built without CUDA kernels"
        if device.type not in ("cpu", "cuda"):
            return f"no kernels for device {device.type}"
        bad = [d for d in dtypes if d not in _CPP_DTYPES]
        return f"unsupported dtype {bad[0]}" if bad else None
    if name == "triton":
        ok, reason = _load_triton()
        if not ok:
            return reason
        if device.type == "cpu":
            if not triton_interpreting():
                return "CPU tensor (Triton runs CPU tensors only with TRITON_INTERPRET=1)"
            if not forced_here:
                return "CPU tensor (the Triton interpreter is for tests: force it to use it)"
        elif device.type != "cuda":
            return f"no kernels for device {device.type}"
        bad = [d for d in dtypes if d not in _TRITON_DTYPES]
        return f"unsupported dtype {bad[0]}" if bad else None
    raise ValueError(name)


def _tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


def select(*args) -> str:
    """The backend that runs a call on these arguments (tensors among them decide)."""
    tensors = _tensors(args)
    name = forced()
    if name is not None:
        reason = why_not(name, tensors, forced_here=True)
        if reason is not None:
            raise BackendUnavailable(f"dinv backend {name!r} was forced but cannot run: {reason}")
        return name
    order = ("cpp", "triton", "reference") if tensors[0].is_cuda else ("cpp", "reference")
    for candidate in order:
        if why_not(candidate, tensors) is None:
            return candidate
    raise AssertionError("the reference backend always runs")


def explain(*args) -> dict[str, str]:
    """For `dinv info` and debugging: each backend -> 'selected' / 'available' / the reason not."""
    tensors = _tensors(args)
    chosen = select(*args)
    report = {}
    for name in NAMES:
        reason = why_not(name, tensors, forced_here=(name == forced()))
        report[name] = "selected" if name == chosen else (reason or "available (lower priority)")
    return report


def primitives(name: str):
    """The torch.ops namespace holding backend `name`'s primitives (autograd + fakes registered)."""
    if name == "cpp":
        return torch.ops.dinv
    if name == "triton":
        return torch.ops.dinv_triton
    raise ValueError(f"backend {name!r} has no primitive ops")
