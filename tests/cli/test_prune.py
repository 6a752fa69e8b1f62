"""`dinv prune`: a whole run (synthesis, pruning, fine-tuning, report), resume after an
interruption without pruning again, hardware-aware pruning of an existing pool, and bad input
refused on one line before any work.

Run in-process through `dinv.cli.main`, with the subcommand added to `SUBCOMMANDS` for the
test when the package does not register it yet."""
from __future__ import annotations

import json
import types

import pytest
import torch

import dinv.cli
import dinv.prune
from dinv import Inverter, models
from dinv.cli import prune as prune_command
from dinv.data import synthesize_dataset
from dinv.presets import digits_settings
from dinv.prune import count_macs, load_pruned

from ._run import one_line_error

TINY = ("prune", "--teacher", "digits", "--num-images", "20", "--iterations", "3",
        "--batch-size", "10", "--kd-batch-size", "10", "--macs-ratio", "0.6", "--steps", "2")


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    if prune_command not in dinv.cli.SUBCOMMANDS:
        monkeypatch.setattr(dinv.cli, "SUBCOMMANDS", dinv.cli.SUBCOMMANDS + (prune_command,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dinv_prune(capsys, *args):
    """`dinv ARGS` in this process: (returncode, stdout, stderr) like a finished subprocess."""
    try:
        status = dinv.cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=captured.out, stderr=captured.err)


def test_cli_prune_synthesizes_prunes_fine_tunes_and_reports(tmp_path, capsys):
    args = TINY + ("--finetune-epochs", "2", "--out", tmp_path)
    result = dinv_prune(capsys, *args)
    assert result.returncode == 0, result.stderr
    for name in ("pool/manifest.json", "prune.json", "pruned-initial.pt", "pruned.pt",
                 "finetune/checkpoint.pt", "finetune/metrics.csv", "report.json", "report.csv",
                 "accuracy_latency.png", "accuracy.png"):
        assert (tmp_path / name).exists(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["model"] for row in report] == ["teacher", "pruned", "fine-tuned"]
    teacher, pruned, tuned = report
    assert teacher["accuracy"] > 0.99 and 0 <= tuned["accuracy"] <= 1
    assert abs(pruned["macs"] / teacher["macs"] - 0.6) <= 0.03
    model = load_pruned(tmp_path / "pruned.pt")
    assert count_macs(model, torch.zeros(1, 1, 16, 16)) == pruned["macs"]
    assert "pruned: " in result.stdout and "(kept: macs 0." in result.stdout
    # Finished: --resume does nothing more; without it the run is never overwritten.
    assert dinv_prune(capsys, *args, "--resume").returncode == 0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    one_line_error(dinv_prune(capsys, *args), 1, "--resume")


def test_an_interrupted_run_resumes_without_pruning_again(tmp_path, capsys, monkeypatch):
    args = TINY + ("--finetune-epochs", "3", "--out", tmp_path)

    def stop_after_one_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(prune_command, "_print_epoch", stop_after_one_epoch)
    assert dinv_prune(capsys, *args).returncode == 130
    assert not (tmp_path / "pruned.pt").exists()
    record = (tmp_path / "prune.json").read_text()

    def no_second_pruning(*a, **k):
        raise AssertionError("pruned again on resume")
    monkeypatch.setattr(dinv.prune, "prune", no_second_pruning)
    monkeypatch.setattr(prune_command, "_print_epoch", lambda row: None)
    result = dinv_prune(capsys, *args, "--resume")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "prune.json").read_text() == record
    metrics = json.loads((tmp_path / "finetune" / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    # Another configuration in the same folder is refused.
    changed = [a if a != "0.6" else "0.7" for a in args]
    one_line_error(dinv_prune(capsys, *changed, "--resume"), 1, "another configuration",
                   "macs_ratio")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """20 digits images (3 inversion iterations): a `dinv invert` folder."""
    folder = tmp_path_factory.mktemp("pool")
    settings = digits_settings()
    settings.pop("iterations")
    synthesize_dataset(Inverter(models.load_digits_teacher(), **settings), folder, 20, range(10),
                       batch_size=10, iterations=3, save_png=False)
    return folder


def test_hardware_aware_pruning_of_an_existing_pool(pool, tmp_path, capsys):
    result = dinv_prune(capsys, "prune", "--teacher", "digits", "--images", pool,
                        "--hardware-aware", "--eta", "2", "--channels-ratio", "0.7",
                        "--finetune-epochs", "0", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("latency-cpu-*.json"))) == 1
    summary = json.loads((tmp_path / "prune.json").read_text())["result"]
    assert summary["eta"] == 2.0 and summary["target"] == {"measure": "channels", "ratio": 0.7}
    assert summary["ratios"]["table_latency"] < 0.7
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["model"] for row in report] == ["teacher", "pruned"]
    assert not (tmp_path / "finetune").exists()


@pytest.mark.parametrize("flags,status,fragment", [
    (["--macs-ratio", "1.5"], 2, "--macs-ratio: must be a fraction in (0, 1)"),
    (["--macs-ratio", "0"], 2, "--macs-ratio"),
    (["--params-ratio", "0.5"], 2, "not allowed with argument --macs-ratio"),
    (["--eta", "1"], 2, "add --hardware-aware"),
    (["--finetune-epochs", "-1"], 2, "--finetune-epochs"),
])
def test_bad_arguments_are_refused_before_any_work(flags, status, fragment, tmp_path, capsys):
    args = list(TINY) + ["--finetune-epochs", "1", "--out", tmp_path / "run"]
    if flags[0] in args:
        index = args.index(flags[0])
        args[index:index + 2] = flags
    else:
        args += flags
    one_line_error(dinv_prune(capsys, *args), status, fragment)
    assert not (tmp_path / "run").exists()


def test_a_teacher_file_needs_its_architecture(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save(models.load_digits_teacher().state_dict(), path)
    one_line_error(dinv_prune(capsys, "prune", "--teacher", path, "--num-images", "10",
                              "--finetune-epochs", "1", "--out", tmp_path / "run"), 2, "--arch")
    assert not (tmp_path / "run").exists()


def test_images_of_another_shape_are_refused(tmp_path, capsys):
    settings = digits_settings()
    settings.pop("iterations")
    settings["image_shape"] = (1, 8, 8)
    synthesize_dataset(Inverter(models.load_digits_teacher(), **settings), tmp_path / "small",
                       10, range(10), batch_size=10, iterations=2, save_png=False)
    one_line_error(dinv_prune(capsys, "prune", "--teacher", "digits", "--images",
                              tmp_path / "small", "--finetune-epochs", "1", "--out",
                              tmp_path / "run"), 2, "(1, 8, 8) images", "(1, 16, 16)")
    assert not (tmp_path / "run").exists()
