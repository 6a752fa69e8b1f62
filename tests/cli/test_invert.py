"""`dinv invert`: a resumable dataset, and resume that never mixes two runs or trusts damaged
files (through the installed entry point)."""
from __future__ import annotations

import json
import os
import pickle

import torch
from torch import nn

from dinv.data import load_shards

from ._run import dinv, one_line_error

DIGITS = ("invert", "--teacher", "digits", "--num-images", "12", "--batch-size", "6",
          "--iterations", "3", "--classes", "3,4")


def test_invert_writes_a_resumable_dataset(tmp_path):
    out = tmp_path / "synth"
    assert dinv(*DIGITS, "--out", out).returncode == 0
    images, labels = load_shards(out)
    assert images.shape == (12, 1, 16, 16) and labels.tolist() == [3, 4] * 6
    assert sorted(os.listdir(out / "images")) == ["003", "004"]
    rerun = dinv(*DIGITS, "--out", out)  # everything done: writes nothing new, does not fail
    assert rerun.returncode == 0 and "2 batches" in rerun.stdout
    assert json.loads((out / "manifest.json").read_text())["completed"] == [0, 1]


def test_resume_refuses_another_configuration_and_says_what_differs(tmp_path):
    out = tmp_path / "synth"
    assert dinv(*DIGITS, "--out", out).returncode == 0
    for flags, name in ((["--lr", "0.2"], "lr"), (["--r-feature", "0.5"], "r_feature"),
                        (["--jitter", "1"], "jitter"), (["--amp", "bf16"], "amp_dtype"),
                        (["--setting", "0"], "setting_id"), (["--seed", "3"], "seed")):
        one_line_error(dinv(*DIGITS, "--out", out, *flags), 1, "another configuration", name)
    assert dinv(*DIGITS, "--out", out, "--lr", "0.2", "--overwrite").returncode == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["inverter"]["lr"] == 0.2


def test_resume_refuses_another_teacher(tmp_path):
    from dinv import models

    weights = tmp_path / "digits.pt"
    teacher = models.load_digits_teacher()
    torch.save(teacher.state_dict(), weights)
    common = ("invert", "--arch", "digits_net", "--num-images", "6", "--batch-size", "6",
              "--iterations", "2", "--image-shape", "1,16,16", "--mean", "0.3", "--std", "0.3",
              "--out", tmp_path / "synth")
    assert dinv(*common, "--teacher", weights).returncode == 0
    with torch.no_grad():
        teacher.classifier.bias.add_(1.0)
    torch.save(teacher.state_dict(), weights)
    one_line_error(dinv(*common, "--teacher", weights), 1, "teacher_sha256")


def test_a_damaged_or_deleted_shard_is_recomputed(tmp_path):
    out = tmp_path / "synth"
    assert dinv(*DIGITS, "--out", out).returncode == 0
    expected = load_shards(out)
    shard0, shard1 = out / "shards" / "batch_00000.pt", out / "shards" / "batch_00001.pt"
    shard0.write_bytes(shard0.read_bytes()[:100])  # truncated
    os.remove(shard1)
    assert dinv(*DIGITS, "--out", out).returncode == 0
    again = load_shards(out)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_never_runs_without_trust_pickle(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    line = one_line_error(dinv("invert", "--teacher", evil, "--num-images", "2",
                               "--out", tmp_path / "o"), 1)
    assert not marker.exists()
    assert "--trust-pickle" in line or "arch" in line


def test_a_whole_pickled_model_loads_with_trust_pickle(tmp_path):
    from dinv import models

    path = tmp_path / "model.pt"
    torch.save(models.load_digits_teacher(), path)
    refused = one_line_error(dinv("invert", "--teacher", path, "--num-images", "2",
                                  "--out", tmp_path / "a"), 1)
    assert "--trust-pickle" in refused or "trust_pickle" in refused
    loaded = dinv("invert", "--teacher", path, "--trust-pickle", "--num-images", "2",
                  "--batch-size", "2", "--iterations", "1", "--image-shape", "1,16,16",
                  "--mean", "0.3", "--std", "0.3", "--out", tmp_path / "b")
    assert loaded.returncode == 0, loaded.stderr


def test_a_text_or_corrupt_teacher_file_is_one_line(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    one_line_error(dinv("invert", "--teacher", text, "--arch", "digits_net", "--num-images", "2",
                        "--out", tmp_path / "o"), 1, str(text))
    one_line_error(dinv("invert", "--teacher", tmp_path / "missing.pt", "--num-images", "2",
                        "--out", tmp_path / "o"), 1, "missing.pt")


def test_a_one_channel_model_without_image_shape_is_a_usage_error(tmp_path):
    path = tmp_path / "gray.pt"
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    torch.save(net, path)
    one_line_error(dinv("invert", "--teacher", path, "--trust-pickle", "--num-images", "2",
                        "--out", tmp_path / "o"), 2, "--image-shape 1,H,W")
