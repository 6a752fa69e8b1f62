"""dinv.plots: written when matplotlib is there, skipped (False) when it is not."""
import sys

from dinv.plots import plot_accuracy, plot_series

ROWS = [{"epoch": 1, "images_synthesized": 10, "val_acc": 0.5},
        {"epoch": 2, "images_synthesized": 20, "val_acc": 0.7}]


def test_plots_are_written(tmp_path):
    assert plot_accuracy(ROWS, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    assert plot_series({"x": ([1, 2], [3, 4])}, tmp_path / "s.png", "x", "y")


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_accuracy(ROWS, tmp_path / "a.png") is False
    assert not (tmp_path / "a.png").exists()
