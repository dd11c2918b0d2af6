"""One plotting helper for every figure: seaborn theme, colour-blind palette, same size and format.

Notebooks call :func:`set_style` once (through :func:`mergelab.notebook.setup`), create figures with
:func:`figure`, and save them with :func:`savefig`; colours come from :func:`palette`, never
hard-coded. Quarto captions and labels live in the notebook cell (``#| fig-cap:``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # the caller's backend, whichever it is (matplotlib picks Agg without a display)
import numpy as np
import pandas as pd
import seaborn as sns

from . import paths
from .utils import atomic_write

PALETTE = "colorblind"
FIGSIZE = (6.4, 3.6)


def set_style(context: str = "notebook") -> None:
    """Apply the house style: seaborn ``whitegrid`` theme with the colour-blind palette."""
    sns.set_theme(context=context, style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.figsize": FIGSIZE, "figure.dpi": 110, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "legend.frameon": False})


def palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` colour-blind safe colours (cycled when ``n`` exceeds the palette)."""
    base = sns.color_palette(PALETTE)
    return [base[i % len(base)] for i in range(n)]


def figure(ncols: int = 1, nrows: int = 1, width: float | None = None, height: float | None = None,
           wide: bool = False, **kwargs) -> tuple[plt.Figure, np.ndarray | plt.Axes]:
    """A figure of the house size: ``FIGSIZE`` per panel, wider per column or when ``wide``.

    Returns ``(fig, ax)`` for one panel, ``(fig, axes)`` (an array) for several.
    """
    w = width or min(FIGSIZE[0] * (max(1, ncols) + (1 if wide else 0)) * 0.75 + 1.6, 14.0)
    h = height or FIGSIZE[1] * nrows
    return plt.subplots(nrows, ncols, figsize=(w, h), **kwargs)


def savefig(fig: plt.Figure, name: str, folder: str | Path | None = None) -> None:
    """Save ``fig`` as ``<reports>/figures/<name>.png`` (folder overridable).

    Returns nothing, so that a notebook cell ending with this call prints no stray ``PosixPath(...)``
    under its figure; the file is :func:`figure_path` ``(name, folder)``, written atomically (an interrupted
    save leaves the previous figure, never a truncated PNG).

    In a Jupyter kernel with matplotlib's inline backend the cell shows this very PNG, rendered once: the figure
    is closed, so the backend does not draw it a second time, and the file's bytes are displayed when the cell
    ends, where the backend would have shown it (after the cell's tables and text). The book's figure is then the
    saved file, byte for byte. Elsewhere (a script, another backend) the figure stays open, as after
    ``Figure.savefig``."""
    folder = Path(folder) if folder else paths.reports_dir() / "figures"
    path = atomic_write(figure_path(name, folder), lambda tmp: fig.savefig(tmp, format="png"))
    shell = _inline_kernel()
    if shell is not None:
        _PENDING.append(path.read_bytes())
        if _show_pending not in shell.events.callbacks["post_execute"]:
            shell.events.register("post_execute", _show_pending)
        plt.close(fig)


_PENDING: list[bytes] = []
"""PNGs :func:`savefig` saved during the running cell, shown when it ends (:func:`_show_pending`)."""


def _inline_kernel() -> object | None:
    """The IPython shell of a Jupyter kernel whose matplotlib backend is the inline one, else ``None``."""
    if "inline" not in str(plt.get_backend()):
        return None
    try:
        from IPython import get_ipython
    except ImportError:  # matplotlib's inline backend without IPython: not a kernel
        return None
    shell = get_ipython()
    return shell if shell is not None and hasattr(shell, "events") else None


def _show_pending() -> None:
    """Display the PNGs saved during the cell that just ended, in the order they were saved."""
    from IPython.display import Image, display

    while _PENDING:
        display(Image(data=_PENDING.pop(0), format="png"))


def figure_path(name: str, folder: str | Path | None = None) -> Path:
    """Where :func:`savefig` writes the figure ``name``: ``<reports>/figures/<name>.png`` by default."""
    return (Path(folder) if folder else paths.reports_dir() / "figures") / f"{name}.png"


def bar_methods(df: pd.DataFrame, value: str, ax: plt.Axes | None = None, hue: str | None = None,
                order: Sequence[str] | None = None, ylabel: str | None = None) -> plt.Axes:
    """Bars of ``value`` per ``method`` (rows of ``df``), optionally split by ``hue``, labelled 0..1. Several rows of
    one bar give their mean with a 95 % bootstrap interval, seeded: the same figure on every run. A split's legend
    sits right of the axes (saved with :func:`set_style`'s tight box), so give such a chart the rightmost panel."""
    if ax is None:
        _, ax = figure()
    sns.barplot(data=df, x="method", y=value, hue=hue, order=order, ax=ax, errorbar=("ci", 95), seed=0,
                palette=PALETTE if hue else None, color=None if hue else palette(1)[0])
    ax.set_xlabel("")
    ax.set_ylabel(ylabel or value.replace("_", " "))
    ax.set_ylim(0, max(1.0, float(df[value].max()) * 1.05))
    if hue and ax.get_legend() is not None:  # beside the bars, not over the tallest ones (saved with a tight box)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return ax


def strip(*args: object, seed: int = 0, **kwargs: object) -> plt.Axes:
    """``seaborn.stripplot(*args, **kwargs)`` with its jitter drawn from ``seed``: seaborn draws it from NumPy's global random
    state, so the dots would move with whatever ran before (a cold or a warm run, another cell). The global state
    is left as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return sns.stripplot(*args, **kwargs)
    finally:
        np.random.set_state(state)


def image_grid(images: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[str]] | None = None,
               per_row: int = 8) -> plt.Figure:
    """One row of example images per task.

    Args:
        images: task name to ``(n, 3, H, W)`` arrays in ``[0, 1]`` (first ``per_row`` shown).
        labels: task name to ``n`` class names shown under the images.
    """
    tasks = list(images)
    fig, axes = plt.subplots(len(tasks), per_row, figsize=(per_row * 0.9, len(tasks) * 1.05),
                             squeeze=False)
    for r, task in enumerate(tasks):
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images[task]):
                ax.imshow(np.clip(np.transpose(images[task][c], (1, 2, 0)), 0, 1), interpolation="nearest")
                if labels is not None:
                    ax.set_title(str(labels[task][c]), fontsize=7, pad=2)
        axes[r, 0].text(-0.15, 0.5, task, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.45, left=0.12)
    return fig
