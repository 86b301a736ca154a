"""``hcformer report``: the ``README.md`` of a results tree.

It says which scale the numbers are and what they mean (smoke numbers exercise the DAG and are
not results; tiny numbers check the paper's orderings at laptop scale; paper numbers are the
reproduction), how many runs are done, failed or missing, every table as Markdown (ours beside
the paper's), whether each ablation orders its rows as the paper does (Kendall's tau), and where
each file is.
"""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path
from typing import Any

from hcformer.analysis.aggregate import read_cells
from hcformer.analysis.tables import failed_seeds, no_objects
from hcformer.experiments import load_tables, x_columns

MEANING = {
    "smoke": (
        "**Smoke scale: these numbers are not results.** Tiny models on synthetic data, trained "
        "for a few iterations, so that every table of the paper runs end to end (every "
        "experiment, every seed, every step of the pipeline) in minutes. They show that the "
        "pipeline works; they say nothing about HCFormer."
    ),
    "tiny": (
        "**Tiny scale.** The paper's model families shrunk in depth and width, randomly "
        "initialised, trained on synthetic data in the real dataset formats for about a thousand "
        "iterations. The absolute numbers are not comparable with the paper's; what can be "
        "compared is the ordering of the rows of an ablation (see the Kendall's tau below)."
    ),
    "paper": (
        "**Paper scale.** The paper's models, data and schedules: these numbers are the "
        "reproduction. Each is the median of the seeds; the paper's own value and the difference "
        "are beside it."
    ),
}


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-a between two equally long sequences (None with fewer than 2 pairs)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return None

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def _fmt(value: Any, column: str = "") -> str:
    """A value as the LaTeX tables print it: one decimal; COCO's -1 (no object of this size, in
    percent -100) and an absent value as an en dash."""
    if value is None or no_objects(value, column):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown_table(cells: list[dict[str, Any]]) -> list[str]:
    """A table's cells as Markdown, then a line explaining the en dash when COCO's -1 is in
    it (the rule of the LaTeX tables)."""
    rows = list(dict.fromkeys(c["row"] for c in sorted(cells, key=lambda c: c["row_index"])))
    columns = list(dict.fromkeys(c["column"] for c in cells))
    by = {(c["row"], c["column"]): c for c in cells}
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    dash = False
    for row in rows:
        out = []
        for column in columns:
            cell = by[(row, column)]
            paper = _fmt(cell["paper"], column)
            dash = dash or no_objects(cell["paper"], column)
            if cell["kind"] == "setting":
                out.append(paper)
            elif cell["status"] in ("ok", "partial"):
                star = ""
                if no_objects(cell["ours"], column):
                    dash = True  # no median to qualify (the LaTeX tables' rule)
                elif cell["status"] == "partial":
                    star = "‡" if failed_seeds(cell) else "†"
                out.append(f"{_fmt(cell['ours'], column)}{star} ({paper})")
            else:
                out.append(f"*{cell['status'].replace('_', ' ')}* ({paper})")
        quoted = " *(quoted)*" if by[(row, columns[0])]["quoted"] else ""
        lines.append(f"| {row}{quoted} | " + " | ".join(out) + " |")
    if dash:
        lines += ["", "– (AP): no object of this size in the evaluation images (COCO's -1)."]
    return lines


def ordering(cells: list[dict[str, Any]]) -> list[str]:
    """For an ablation table (one that varies a setting a figure plots on its x axis): per
    metric column, Kendall's tau of ours vs the paper's values."""
    columns = list(dict.fromkeys(c["column"] for c in cells))
    if not any(c in columns for c in x_columns()):
        return []
    out = []
    for column in columns:
        metric_cells = [c for c in cells if c["column"] == column and c["kind"] == "metric"]
        pairs = [
            (c["ours"], c["paper"])
            for c in metric_cells
            if c["status"] in ("ok", "partial")
            and isinstance(c["paper"], (int, float))
            and not no_objects(c["ours"], column)
            and not no_objects(c["paper"], column)
        ]
        if len(pairs) < 2:
            continue
        tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
        out.append(
            f"- {column}: Kendall's tau between our medians and the paper's values over "
            f"{len(pairs)} rows = {tau:+.2f} (+1: the paper's ordering exactly)"
        )
    return out


def run_counts(runs_csv: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if runs_csv.exists():
        with runs_csv.open() as fh:
            for line in csv.DictReader(fh):
                counts[line["status"]] = counts.get(line["status"], 0) + 1
    return counts


def render(results: Path, scale: str, note: str = "") -> str:
    """The README of the results tree at ``results``; ``note``: a paragraph after the one on
    what the scale's numbers mean (a snapshot says what it is)."""
    counts = run_counts(results / "runs.csv")
    total = sum(counts.values())
    lines = [
        f"# HCFormer reproduction: results at scale `{scale}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `hcformer report` "
        "from the run folders under `runs/` (Suzuki 2022, arXiv:2205.09949v3).",
        "",
        MEANING.get(scale, f"Scale `{scale}`."),
        "",
        *([note, ""] if note else []),
        "## Runs",
        "",
        f"{total} runs expected: "
        + (
            ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            if counts
            else "no runs.csv yet"
        )
        + ". Every run folder holds `config.yaml`, `job.json`, `train_log.jsonl`, `metrics.json`; "
        "`runs.csv` lists them all, `summary.csv` has the median, min, max and number of seeds "
        "per experiment and metric, and MLflow (`mlflow.db` unless `MLFLOW_TRACKING_URI` was set) "
        "has one run per folder, tagged `table.<id>` with the row it feeds.",
        "",
        "## Files",
        "",
        "- `tables/<id>.tex`: each paper table (booktabs; paper, ours, difference); "
        "`tables.pdf`: all of them (when pdflatex is installed); `macros.tex`: one LaTeX macro "
        "per number;",
        "- `provenance/<id>.json`: for every cell, the runs (experiment, seed, MLflow run id, git "
        "commit) or the profile it came from;",
        "- `figures/<id>.pdf|png`: the ablations (each seed a point, the median a line, the paper "
        "dashed); `figures/hierarchy/`: the Fig. 5-style view of trained runs;",
        "- `profile/<id>.json`: parameters, GFLOPs (and latency) of every row.",
        "",
        "## Tables",
        "",
        "Each cell: ours (the paper's). † = median of fewer seeds than expected (‡: another "
        "seed failed); *missing*, *running*, *failed* or *not built* = no number yet (never "
        "dropped); *(quoted)* rows are numbers the paper quotes from other papers.",
    ]
    for table in load_tables():
        path = results / "aggregate" / f"{table.id}.csv"
        lines += ["", f"### {table.id}: {table.title}", ""]
        if not path.exists():
            lines.append("*not aggregated yet*")
            continue
        cells = read_cells(path)
        lines += markdown_table(cells)
        order = ordering(cells)
        if order:
            lines += ["", *order]
    return "\n".join(lines) + "\n"
