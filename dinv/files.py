"""Writing files so that an interruption never leaves a truncated one behind, and reading back
the files dinv wrote without unpickling code.

Every writer goes to a temporary name in the same folder and renames it over the target: the
rename is atomic, so a reader (or a resumed run) sees the old file or the new one, never half.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import torch


def _replace(path, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_json(obj, path) -> None:
    """JSON (indented) written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _replace(path, write)


def atomic_save(obj, path) -> None:
    """torch.save written atomically."""
    _replace(path, lambda tmp: torch.save(obj, tmp))


def atomic_csv(rows, path, fields) -> None:
    """CSV with a header of `fields` (one row per dict of `rows`) written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text.getvalue())
    _replace(path, write)


def write_metrics(rows, out_dir, fields, stem: str = "metrics") -> None:
    """`<stem>.json` (every key of every row) and `<stem>.csv` (the columns `fields`) in
    `out_dir`, each written atomically."""
    atomic_json(list(rows), os.path.join(out_dir, f"{stem}.json"))
    atomic_csv(rows, os.path.join(out_dir, f"{stem}.csv"), fields)


def file_digest(path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, to notice a damaged one later."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


class DamagedFile(ValueError):
    """A file dinv wrote cannot be read back (truncated, corrupt, or not what it should be)."""


def load_tensors(path, map_location="cpu"):
    """torch.load of a file dinv wrote (tensors, dicts, lists, numbers, strings only): with
    `weights_only=True`, so a file edited to hold a pickled object cannot run code. Errors name
    the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to read is a damaged file, named
        raise DamagedFile(f"{path} cannot be read ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'no detail'})") \
            from error


def describe_difference(saved: dict, current: dict) -> str:
    """'key: saved -> current' for every (nested, dotted) key whose value differs, for one-line
    error messages."""
    parts = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b), key=str):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, f"{prefix}{key}.")
            elif x != y:
                parts.append(f"{prefix}{key}: {x!r} -> {y!r}")

    walk(saved, current, "")
    return "; ".join(parts) if parts else "same keys, other values"
