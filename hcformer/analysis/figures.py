"""``hcformer figures``: the figure of an ablation table (``figure: true`` in its YAML).

Each seed is a point, the median of the seeds a line, the paper's values a dashed line beside
them; one panel per metric column of the table (table IV: COCO PQ, ADE20K mIoU, Cityscapes
mIoU), the varied setting on the x axis (the table's first ``axis: x`` column of
``experiments/columns.yaml``: hierarchy level, decoder layers, queries), an ``axis: hue``
setting as two colours (DCNv2 on/off, table II); axes titled with the columns' plain titles.
Read from the table's cells
(``<results>/aggregate/<table>.csv``, written by ``hcformer aggregate``); writes
``<results>/figures/<table>.pdf`` and ``.png``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from hcformer.errors import HCFormerError
from hcformer.experiments import columns, x_columns


def plain(column: str) -> str:
    """A column's plain-text title (experiments/columns.yaml), or its key."""
    known = columns().get(column)
    return known.plain if known else column


def figure_data(cells: list[dict[str, Any]]) -> tuple[str, str | None, list[str], list[dict]]:
    """``(x column, hue column or None, metric columns, long-form points)`` of a table.

    A point is ``{"panel", "x", "hue", "value", "what"}`` with ``what`` = ``ours (seed k)`` or
    ``paper``.
    """
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in cells:
        by_row.setdefault(cell["row"], {})[cell["column"]] = cell
    table_columns = list(dict.fromkeys(c["column"] for c in cells))
    xs = [c for c in x_columns() if c in table_columns]
    if not xs:
        raise HCFormerError(
            f"table {cells[0]['table'] if cells else '?'}: no varied setting column "
            f"({', '.join(x_columns())}) to plot against"
        )
    x_col = xs[0]
    hues = [c for c, known in columns().items() if known.axis == "hue" and c in table_columns]
    hue_col = hues[0] if hues else None
    metrics = [c for c in table_columns if cells and by_row[cells[0]["row"]][c]["kind"] == "metric"]
    points = []
    for row in by_row.values():
        x = row[x_col]["paper"]
        if hue_col:
            hue = ("with " if row[hue_col]["paper"] else "without ") + plain(hue_col)
        else:
            hue = "HCFormer"
        for metric in metrics:
            cell = row[metric]
            if cell["paper"] is not None:
                points.append(
                    {"panel": metric, "x": x, "hue": hue, "value": cell["paper"], "what": "paper"}
                )
            for run in cell["runs"]:
                if run.get("value") is not None:
                    points.append(
                        {"panel": metric, "x": x, "hue": hue, "value": run["value"], "what": "ours"}
                    )
    return x_col, hue_col, metrics, points


def draw(cells: list[dict[str, Any]], title: str, scale: str, out_stem: Path) -> list[Path]:
    """Draw the figure of a table's cells into ``<out_stem>.pdf`` and ``.png``."""
    matplotlib.use("Agg")  # files only: no window, whatever the default backend is
    x_col, _hue_col, metrics, points = figure_data(cells)
    frame = pd.DataFrame(points, columns=["panel", "x", "hue", "value", "what"])
    sns.set_theme(style="whitegrid", context="paper")
    width = max(4.2 * len(metrics), 7.0)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 3.6), squeeze=False)
    hues = list(dict.fromkeys(frame["hue"])) or ["HCFormer"]
    palette = dict(zip(hues, sns.color_palette("deep", len(hues))))
    for ax, metric in zip(axes[0], metrics):
        part = frame[frame["panel"] == metric]
        ours, paper = part[part["what"] == "ours"], part[part["what"] == "paper"]
        if not ours.empty:
            seeds = dict(data=ours, x="x", y="value", hue="hue", palette=palette, ax=ax)
            sns.scatterplot(**seeds, alpha=0.6, s=28, legend=False)
            sns.lineplot(**seeds, estimator="median", errorbar=None, marker="o", legend=False)
        else:
            ax.text(0.5, 0.5, "no runs yet", transform=ax.transAxes, ha="center", color="0.4")
        for hue, line in paper.groupby("hue", sort=False):
            line = line.sort_values("x")
            ax.plot(line["x"], line["value"], linestyle="--", marker="x", color=palette[hue])
        ax.set_xlabel(plain(x_col))
        ax.set_ylabel(plain(metric))
        xs = sorted(set(part["x"]))
        if xs:
            ax.set_xticks(xs)
            if columns()[x_col].scale == "log2":
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(int(x)) for x in xs])
    handles = [
        Line2D(
            [], [], color="0.3", marker="o", linestyle="-", label="ours: median (points: seeds)"
        ),
        Line2D([], [], color="0.3", marker="x", linestyle="--", label="paper"),
    ]
    if len(hues) > 1:
        handles += [Line2D([], [], color=palette[h], linewidth=3, label=h) for h in hues]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    note = "" if scale == "paper" else f" [scale {scale}: not results]"
    fig.suptitle(textwrap.fill(f"{title}{note}", width=int(width * 11)), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".pdf"), out_stem.with_suffix(".png")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths
