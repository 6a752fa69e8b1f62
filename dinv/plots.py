"""Plots of the applications' metrics. matplotlib is optional (`pip install matplotlib`): without
it every function here returns False and writes nothing, so a finished run never fails on a plot.
They draw on matplotlib's Agg canvas directly (no pyplot), leaving the caller's backend alone."""
from __future__ import annotations

import os


def _figure(size):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> bool:
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.png")
    figure.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return True


def plot_accuracy(metrics, path) -> bool:
    """A PNG of the validation accuracy per epoch (left) and against the images synthesized so
    far (right: what the student cost in inversions; a DI run is a vertical line at its pool
    size). `metrics`: one run's rows, or {label: rows} to compare runs. Returns whether it was
    written (False without matplotlib)."""
    figure = _figure((10, 4))
    if figure is None:
        return False
    runs = metrics if isinstance(metrics, dict) else {None: metrics}
    for axes, x in zip(figure.subplots(1, 2, sharey=True), ("epoch", "images_synthesized")):
        for label, rows in runs.items():
            rows = [r for r in rows if r.get("val_acc") is not None and x in r]
            axes.plot([r[x] for r in rows], [100 * r["val_acc"] for r in rows], marker=".",
                      label=label)
        axes.set_xlabel(x.replace("_", " "))
        axes.grid(alpha=0.3)
    axes.set_xlim(left=0)
    figure.axes[0].set_ylabel("validation accuracy (%)")
    if len(runs) > 1:
        axes.legend()
    return _save(figure, path)


def plot_series(series: dict, path, xlabel: str, ylabel: str, title: str | None = None,
                kind: str = "line") -> bool:
    """A PNG of named series {label: (xs, ys)} as lines (kind="line") or points ("scatter");
    returns whether it was written (False without matplotlib)."""
    figure = _figure((6, 4))
    if figure is None:
        return False
    axes = figure.subplots()
    for label, (xs, ys) in series.items():
        if kind == "scatter":
            axes.scatter(xs, ys, label=label)
        else:
            axes.plot(xs, ys, marker=".", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return _save(figure, path)
