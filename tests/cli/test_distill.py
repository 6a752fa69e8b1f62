"""`dinv distill` through the installed entry point: both modes, resume, bad values rejected
before any synthesis, a plot that never fails a finished run, and a checkpoint that cannot run
code."""
from __future__ import annotations

import json
import pickle

import pytest

from dinv.training import CHECKPOINT, METRICS_CSV, METRICS_JSON

from ._run import dinv, one_line_error
from .test_invert import _Payload

TINY = ("distill", "--teacher", "digits", "--images", "20", "--epochs", "2", "--iterations", "3",
        "--batch-size", "10", "--kd-batch-size", "10", "--synth-every", "1")


@pytest.mark.parametrize("mode", ["di", "adi"])
def test_cli_distill(mode, tmp_path):
    args = TINY + ("--mode", mode, "--out", tmp_path)
    result = dinv(*args)
    assert result.returncode == 0, result.stderr
    for name in (CHECKPOINT, METRICS_CSV, METRICS_JSON, "student.pt", "accuracy.png"):
        assert (tmp_path / name).exists(), name
    metrics = json.loads((tmp_path / METRICS_JSON).read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(0 <= m["val_acc"] <= 1 for m in metrics)
    assert metrics[-1]["images_synthesized"] == 20
    assert dinv(*args, "--resume").returncode == 0  # finished: nothing more to do
    assert json.loads((tmp_path / METRICS_JSON).read_text()) == metrics
    one_line_error(dinv(*args), 1, "--resume")  # a finished run is never overwritten


@pytest.mark.parametrize("flags,name", [(["--epochs", "0"], "--epochs"),
                                        (["--epochs", "-1"], "--epochs"),
                                        (["--kd-batch-size", "0"], "--kd-batch-size"),
                                        (["--images", "0"], "--images"),
                                        (["--temperature", "0"], "--temperature")])
def test_bad_values_are_rejected_before_synthesis(flags, name, tmp_path):
    args = [a for a in TINY]
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    one_line_error(dinv(*args, "--out", tmp_path / "run"), 2, name)
    assert not (tmp_path / "run").exists()


def test_adi_schedule_without_room_is_rejected_before_synthesis(tmp_path):
    one_line_error(dinv("distill", "--teacher", "digits", "--mode", "adi", "--images", "400",
                        "--epochs", "1", "--batch-size", "10", "--kd-batch-size", "100",
                        "--out", tmp_path / "run"), 2, "raise epochs")
    assert not (tmp_path / "run").exists()


def test_a_missing_matplotlib_does_not_fail_a_finished_run(tmp_path):
    blocker = tmp_path / "blocker"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib')\n")
    result = dinv(*TINY, "--out", tmp_path / "run", env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "student.pt").exists()
    assert not (tmp_path / "run" / "accuracy.png").exists()
    assert "pip install matplotlib" in result.stdout


def test_resume_never_unpickles_an_edited_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert dinv(*TINY, "--out", run, "--epochs", "1").returncode == 0
    marker = tmp_path / "pwned"
    with open(run / CHECKPOINT, "wb") as f:
        pickle.dump({"config": _Payload(marker)}, f)
    one_line_error(dinv(*TINY, "--out", run, "--resume"), 1, CHECKPOINT)
    assert not marker.exists()
