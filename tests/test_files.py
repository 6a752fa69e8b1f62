"""dinv.files: atomic writes, safe reads of dinv's own files, and run-configuration diffs."""
import os
import pickle

import pytest
import torch

from dinv.files import (DamagedFile, atomic_csv, atomic_json, atomic_save, describe_difference,
                        file_digest, load_tensors, write_metrics)


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    atomic_json({"a": 1}, tmp_path / "x.json")
    atomic_save({"t": torch.ones(2)}, tmp_path / "sub" / "x.pt")
    atomic_csv([{"a": 1, "b": 2, "c": 3}], tmp_path / "x.csv", ["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["sub", "x.csv", "x.json"]
    assert (tmp_path / "x.csv").read_text().splitlines() == ["a,b", "1,2"]
    assert torch.equal(load_tensors(tmp_path / "sub" / "x.pt")["t"], torch.ones(2))
    write_metrics([{"epoch": 1, "loss": 0.5}], tmp_path, ["epoch"])
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "metrics.csv").exists()


def test_file_digest_notices_a_change(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    before = file_digest(path)
    path.write_bytes(b"abd")
    assert before["bytes"] == 3 and file_digest(path) != before


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_tensors_never_unpickles_code_and_names_the_file(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "marker"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Marker(marker)}, f)
    with pytest.raises(DamagedFile, match="evil.pt"):
        load_tensors(evil)
    assert not marker.exists()
    truncated = tmp_path / "t.pt"
    torch.save({"x": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(DamagedFile, match="t.pt"):
        load_tensors(truncated)
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "missing.pt")


def test_describe_difference_names_nested_keys():
    text = describe_difference({"a": 1, "inv": {"lr": 0.1, "jitter": 2}},
                               {"a": 1, "inv": {"lr": 0.2, "jitter": 2}, "b": 3})
    assert text == "b: '<absent>' -> 3; inv.lr: 0.1 -> 0.2"
