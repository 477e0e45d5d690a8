"""Results people compare: Markdown tables, JSON files and PNG plots."""

import json
import os
from typing import Iterable, Optional

from .safetensors_io import atomic_write_text


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def markdown_table(rows: Iterable[dict], columns: Optional[list] = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts), in the order of ``columns``."""
    rows = list(rows)
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(directory: str, name: str, data: dict, markdown: str) -> dict:
    """Write ``<name>.json`` and ``<name>.md`` atomically; return their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, f"{name}.json"), "markdown": os.path.join(directory, f"{name}.md")}
    atomic_write_text(paths["json"], json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], markdown.rstrip() + "\n")
    return paths


def scatter_plot(points: list, path: str, *, x: str, y: str, title: str, log_x: bool = False, y_range=None) -> str:
    """A labelled scatter plot of ``points`` (dicts with ``label``, ``x`` and ``y`` keys) as PNG.

    ``y_range`` fixes the y axis (e.g. ``(0, 1)`` for an accuracy), so close values look close.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for point in points:
        ax.scatter(point["x"], point["y"], s=60)
        ax.annotate(point["label"], (point["x"], point["y"]), textcoords="offset points", xytext=(6, 6))
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
    if y_range is not None:
        ax.set_ylim(*y_range)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Lay out ``fig``, write it to ``path`` as PNG atomically (never a half-written file) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
