"""Loading a trained teacher from a file: `load_teacher`.

A checkpoint is read with `torch.load(..., weights_only=True)` first, which only rebuilds tensors
and plain containers. A file that needs more (a whole pickled nn.Module, or a training checkpoint
holding e.g. an argparse.Namespace) is unpickled with `weights_only=False` only when the caller
passes `trust_pickle=True`: unpickling can run arbitrary code.
"""
from __future__ import annotations

import functools
import os
import pickle
import pickletools
import re
from collections.abc import Mapping

import torch
from torch import nn

from . import registry

TIMM_PREFIX = "timm:"
DIGITS = "digits"
# Keys under which training scripts commonly nest the model's state_dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torchvision layouts compared against a checkpoint's keys to suggest an --arch on a mismatch.
_TORCHVISION_HINTS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn",
                      "mobilenet_v2", "densenet121")
_SHOWN_KEYS = 5


def load_teacher(path_or_name, arch: str | None = None, num_classes: int | None = None,
                 trust_pickle: bool = False, map_location="cpu") -> nn.Module:
    """A trained model in eval mode, on the CPU unless `map_location` (as for torch.load) says
    otherwise.

    - "digits": the shipped digits teacher (`load_digits_teacher`).
    - a state_dict file with `arch` (a `dinv.models.names()` name, "torchvision:<name>" or
      "timm:<name>"): the model is built and loaded strictly. The state_dict may be nested under
      "state_dict", "model_state_dict", "model" or "net", and its keys prefixed by "module."
      (DataParallel/DDP) or "_orig_mod." (torch.compile). With num_classes=None, the class count
      is read from the classifier weight's shape.
    - a file holding a whole pickled nn.Module, without `arch`: loaded only with
      trust_pickle=True, since unpickling can run arbitrary code.

    Raises FileNotFoundError for a missing file and ValueError for anything else that does not
    give a model (not a torch file, a state_dict without `arch`, keys that do not fit `arch`, a
    file needing pickle without trust_pickle=True), with the file named.
    """
    if isinstance(path_or_name, str) and path_or_name == DIGITS:
        return _place(registry.load_digits_teacher(), map_location).eval()
    path = os.fspath(path_or_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher {path!r}: no such file (and not {DIGITS!r}, the shipped "
                                "digits teacher)")
    if os.path.isdir(path):
        raise ValueError(f"teacher {path!r} is a directory, not a torch checkpoint file")
    if arch is not None:
        _check_arch(arch)

    content = _read(path, map_location, trust_pickle, arch)
    if arch is None:
        model = _whole_model(content)
        if model is not None:
            return _place(model, map_location).eval()
        state = _find_state_dict(content)
        if state is not None:
            raise ValueError(f"{path} holds a state_dict, not a whole model: pass arch= (--arch) "
                             f"to say which model it is for{_layout_hint(state)}. "
                             f"{_known_archs()}")
        raise ValueError(f"{path} holds {_describe(content)}, neither a model nor a state_dict")

    model = _whole_model(content)
    state = model.state_dict() if model is not None else _find_state_dict(content)
    if state is None:
        raise ValueError(f"{path} holds {_describe(content)}, not a state_dict for {arch!r}")
    state = _strip_prefixes(state)
    if num_classes is None:
        num_classes = _infer_num_classes(arch, state)
    model = _place(_build(arch, num_classes), map_location)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not fit (the key lists are not returned)
        expected = set(model.state_dict())
        raise ValueError(_mismatch_message(
            path, arch, state, [k for k in model.state_dict() if k not in state],
            [k for k in state if k not in expected], error=error)) from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(_mismatch_message(path, arch, state, result.missing_keys,
                                           result.unexpected_keys))
    return model.eval()


# -- reading ------------------------------------------------------------------------------------
def _read(path, map_location, trust_pickle, arch):
    """The file's content, read with weights_only=True, or (trust_pickle only) with full pickle
    where the file references other Python objects. Never runs a pickled payload otherwise."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        references = _unsafe_globals(path, error)
        if references is None:
            raise _unreadable(path, error) from None
    except Exception as error:  # noqa: BLE001 - zip, EOF, key errors: a damaged or foreign file
        raise _unreadable(path, error) from None
    if not trust_pickle:
        shown = ", ".join(references[:_SHOWN_KEYS]) if references else "Python objects"
        raise ValueError(
            f"{path} is not a plain state_dict: it holds pickled Python objects ({shown}), and "
            "unpickling them (as loading a whole pickled model does) can run arbitrary code, so "
            "it was not loaded. Pass trust_pickle=True (--trust-pickle) only if you trust where the file came "
            "from. Better, save a state_dict instead, `torch.save(model.state_dict(), path)`, "
            "and load that with arch= (--arch) naming its architecture "
            f"({'required for a state_dict' if arch is None else 'as you did'}).")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None


def _unsafe_globals(path, error):
    """The Python objects a checkpoint refers to beyond what weights_only allows (read without
    unpickling), [] where they are unknown but the error says so, None where `error` means a
    damaged file rather than a file that needs pickle."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            found = finder(path)
        except Exception:  # noqa: BLE001 - not a zip checkpoint (legacy format or damaged)
            found = None
        if found:
            return list(found)
    # The legacy (non-zip) format, or a zip the static scan could not read: torch's message.
    message = str(error)
    if "weights only load failed" not in message.lower():
        return None  # e.g. "invalid load key": not a pickle at all
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    if found:
        return list(dict.fromkeys(found))
    # An opcode the weights-only unpickler lacks: a real pickle (e.g. protocol 4, pickle.dump)
    # parses to its end without running anything; random bytes do not.
    return _pickle_globals(path)


def _pickle_globals(path):
    """The "module.name" globals a plain pickle file refers to, read with pickletools (which
    executes nothing); None when the file is not a complete pickle."""
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, argument, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    names.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(argument, str):
                    strings.append(argument)
                if opcode.name == "STOP":
                    return list(dict.fromkeys(names))
    except Exception:  # noqa: BLE001 - not a pickle
        return None
    return None


def _unreadable(path, error):
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
    return ValueError(f"{path} is not a readable torch checkpoint (torch.load failed with "
                      f"{type(error).__name__}: {detail[:200]}); is it truncated, corrupt or "
                      "not a file written by torch.save?")


# -- what the file holds ------------------------------------------------------------------------
def _whole_model(content):
    if isinstance(content, nn.Module):
        return content
    if isinstance(content, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(content.get(key), nn.Module):
                return content[key]
    return None


def _is_state_dict(content) -> bool:
    return (isinstance(content, Mapping) and len(content) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in content.items()))


def _find_state_dict(content, depth: int = 0):
    """The state_dict in `content`, itself or nested under one of WRAPPER_KEYS, or None."""
    if _is_state_dict(content):
        return content
    if isinstance(content, Mapping) and depth < 3:
        for key in WRAPPER_KEYS:
            if key in content:
                found = _find_state_dict(content[key], depth + 1)
                if found is not None:
                    return found
    return None


def _strip_prefixes(state):
    """Keys without the "module." / "_orig_mod." prefixes that every key shares."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _describe(content) -> str:
    if isinstance(content, Mapping):
        keys = list(content)[:_SHOWN_KEYS]
        return f"a {type(content).__name__} with keys {keys}" + (
            " ..." if len(content) > _SHOWN_KEYS else "")
    return f"a {type(content).__name__}"


# -- building -----------------------------------------------------------------------------------
def _check_arch(arch: str):
    if arch.startswith(TIMM_PREFIX):
        _timm()
    elif not arch.startswith(registry.TORCHVISION_PREFIX) and arch not in registry.names():
        raise ValueError(f"unknown arch {arch!r}. {_known_archs()}")


def _timm():
    try:
        import timm
    except ImportError as error:
        raise ImportError("timm:<name> architectures need timm, which is not installed: "
                          "pip install timm") from error
    return timm


def _build(arch: str, num_classes: int | None = None) -> nn.Module:
    if arch.startswith(TIMM_PREFIX):
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return _timm().create_model(arch[len(TIMM_PREFIX):], pretrained=False, **kwargs)
    return registry.create(arch, num_classes=num_classes)


def _classifier(model: nn.Module):
    """(name, module) of the model's last nn.Linear, taken as its classifier, or None."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _infer_num_classes(arch: str, state) -> int | None:
    """The checkpoint's class count where its classifier weight's rows differ from the arch's
    default, else None (the default)."""
    try:
        with torch.device("meta"):
            probe = _build(arch)
    except Exception:  # noqa: BLE001 - a model that cannot be built on "meta": build it for real
        probe = _build(arch)
    found = _classifier(probe)
    if found is None:
        return None
    name, linear = found
    weight = state.get(f"{name}.weight" if name else "weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 \
            and weight.shape[0] != linear.out_features:
        return int(weight.shape[0])
    return None


# -- explaining a mismatch ----------------------------------------------------------------------
def _known_archs() -> str:
    return (f"Known archs: {', '.join(registry.names())}, "
            f"{registry.TORCHVISION_PREFIX}<torchvision model name>, "
            f"{TIMM_PREFIX}<timm model name>.")


@functools.lru_cache(maxsize=None)
def _layout_keys(arch: str):
    """The state_dict keys of `arch` (num_batches_tracked left out), built on the meta device."""
    try:
        with torch.device("meta"):
            model = _build(arch)
    except Exception:  # noqa: BLE001
        return None
    return frozenset(k for k in model.state_dict() if not k.endswith("num_batches_tracked"))


def _layout_hint(state, arch: str | None = None) -> str:
    """"; its keys match X" where the checkpoint's keys are exactly another known layout's, or
    '; its keys are closest to X' where most of them agree; else ""."""
    keys = frozenset(k for k in _strip_prefixes(state) if not k.endswith("num_batches_tracked"))
    candidates = registry.names() + [registry.TORCHVISION_PREFIX + name
                                     for name in _TORCHVISION_HINTS]
    exact, scored = [], []
    for candidate in candidates:
        layout = _layout_keys(candidate)
        if not layout:
            continue
        if layout == keys:
            exact.append(candidate)
        else:
            scored.append((len(layout & keys) / len(layout | keys), candidate))
    exact = [c for c in exact if c != arch]
    if exact:
        return f"; its keys match {' or '.join(repr(c) for c in exact)}"
    if arch is not None and _layout_keys(arch) == keys:
        return ""
    if scored:
        score, best = max(scored)
        if score >= 0.8 and best != arch:
            return f"; its keys are closest to {best!r}"
    return ""


def _mismatch_message(path, arch, state, missing=(), unexpected=(), error=None) -> str:
    parts = [f"{path} does not fit arch {arch!r}"]
    if error is not None:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        lines = lines or [str(error).strip()[:500]]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_shown(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_shown(unexpected)}")
    if error is not None:
        parts.append("; ".join(lines[:_SHOWN_KEYS]) + (" ..." if len(lines) > _SHOWN_KEYS else ""))
    return ": ".join(parts[:1]) + ": " + "; ".join(parts[1:]) + _layout_hint(state, arch)


def _shown(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _place(model: nn.Module, map_location) -> nn.Module:
    """The model on `map_location` when that names a device (a dict or a function is only for
    torch.load's tensors)."""
    if isinstance(map_location, (str, torch.device)):
        return model.to(map_location)
    return model


__all__ = ["TIMM_PREFIX", "WRAPPER_KEYS", "WRAPPER_PREFIXES", "load_teacher"]
