"""What dinv can run here: `python -m dinv.info` / `dinv info`."""
from __future__ import annotations

import platform

import torch

from .ops import _backends


def _availability(name: str, x: torch.Tensor) -> str:
    """'available' when backend `name` runs every op on tensors like `x`, else its reasons (per op
    where they differ between ops, e.g. an extension built before an op existed)."""
    reasons = {op: _backends.why_not(name, op, [x], forced_here=True) for op in _backends.OPS}
    distinct = set(reasons.values())
    if distinct == {None}:
        return "available"
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"{op}: {reason or 'available'}" for op, reason in reasons.items())


def backends() -> dict:
    """Each backend -> 'available' or the reason it cannot run, for CPU and (if present) CUDA
    fp32 tensors, plus what was built."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for device in devices:
        x = torch.empty(0, device=device)
        report[device] = {name: _availability(name, x) for name in _backends.NAMES}
        report[device]["auto"] = (_backends.select("channel_stats", x)
                                  if _backends.forced() is None else None)
    report["forced"] = _backends.forced()
    report["cpp_built_with_cuda"] = _backends.cpp_has_cuda()
    return report


def describe() -> str:
    lines = [f"dinv on Python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), GPU: "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]
    report = backends()
    lines.append(f"C++ extension built with CUDA kernels: {report['cpp_built_with_cuda']}")
    lines.append(f"forced backend (DINV_BACKEND): {report['forced'] or 'none'}")
    for device in [d for d in ("cpu", "cuda") if d in report]:
        lines.append(f"{device} tensors -> {report[device]['auto'] or report['forced']}")
        for name in _backends.NAMES:
            lines.append(f"  {name:9s} {report[device][name]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
