"""Training curves as a file, like the chapter's figure: train loss, train accuracy and test
accuracy per epoch on one axis. Uses matplotlib's object API with the Agg canvas, so it needs
no screen, no notebook and never touches pyplot's global state."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES = (
    ("train_loss", "train loss", "-"),
    ("train_acc", "train acc", "--"),
    ("test_acc", "test acc", "-."),
)


def history_figure(history: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """The curves of ``history`` (rows with ``epoch``, ``train_loss``, ``train_acc``,
    ``test_acc``) as a matplotlib figure with an Agg canvas; ticks only at whole epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_history: expected at least one epoch of history, got none.")
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [int(row["epoch"]) for row in history]
    for key, label, style in CURVES:
        ax.plot(epochs, [float(row[key]) for row in history], style, label=label, marker=".")
    ax.set_xlabel("epoch")
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    # min_n_ticks=1: a one-epoch run gets the tick 1, not 0.5 and 1.5
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Write :func:`history_figure` to ``path`` (format from the suffix, e.g. .png or .svg);
    return the path."""
    path = Path(path)
    history_figure(history, title=title).savefig(path, dpi=120)
    return path


__all__ = ["history_figure", "plot_history"]
