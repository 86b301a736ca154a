"""``hcformer tables``: the paper's tables as booktabs LaTeX, macros, provenance and a PDF.

From a table's cells (``hcformer aggregate``; ``<results>/aggregate/<table>.csv``):

- ``tables/<table>.tex``: a ``table`` float in the paper's layout (its rows and columns, in its
  order); each number column shows the paper's value, ours (median of the seeds) and the
  difference; rows the paper quotes from other papers are marked as quoted (never trained);
  runs that are missing, failed or not built yet are marked so, never dropped; a median of fewer
  seeds than expected carries a dagger;
- ``provenance/<table>.json``: for every cell, the runs it came from (experiment, seed, value,
  MLflow run id, git commit) or the profile file, or the paper quoted;
- ``macros.tex`` (``--macros``): one macro per number of every table, e.g.
  ``\\hcTableFiveHCFormerRFiftyLThreePqOurs``, so a manuscript can ``\\input`` it;
- ``tables.pdf`` (``--pdf``): every table in one document, compiled with pdflatex.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hcformer.analysis.aggregate import read_cells
from hcformer.errors import HCFormerError

COLUMN_TITLES = {
    "pq": "PQ",
    "pq_th": r"PQ\textsuperscript{Th}",
    "pq_st": r"PQ\textsuperscript{St}",
    "ap_th_pan": r"AP\textsuperscript{Th}\textsubscript{pan}",
    "miou_pan": r"mIoU\textsubscript{pan}",
    "ap": "AP",
    "ap_s": r"AP\textsubscript{S}",
    "ap_m": r"AP\textsubscript{M}",
    "ap_l": r"AP\textsubscript{L}",
    "ap_boundary": r"AP\textsuperscript{boundary}",
    "miou": "mIoU",
    "pixel_acc": "Pixel acc.",
    "params_m": r"\#Params (M)",
    "gflops": "GFLOPs",
    "latency_ms": "Latency (ms)",
    "crop": "Crop",
    "hierarchy_level": "Level",
    "decoder_layers": "Layers",
    "dcnv2": "DCNv2",
    "queries": "Queries",
    "coco_pq": "COCO PQ",
    "ade20k_miou": "ADE20K mIoU",
    "cityscapes_miou": "Cityscapes mIoU",
}
STATUS_MARKS = {
    "missing": r"\textit{missing}",
    "failed": r"\textit{failed}",
    "not_built": r"\textit{not built}",
    "no_metric": r"\textit{n/a}",
    "quoted": r"\textit{quoted}",
}
PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage[margin=1.5cm,landscape]{geometry}
\usepackage{booktabs}
\usepackage{graphicx}
\begin{document}
"""


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (row labels, sources)."""
    out = []
    for ch in str(text):
        if ch in "&%$#_{}":
            out.append("\\" + ch)
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        else:
            out.append(ch)
    return "".join(out)


def fmt(value: Any, column: str = "") -> str:
    """A number as the paper prints it: one decimal (integers for params/GFLOPs settings)."""
    if value is None or value == "":
        return "--"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if column in ("hierarchy_level", "decoder_layers", "queries", "crop"):
            return str(int(value))
        if column in ("params_m", "gflops") and 0 < abs(float(value)) < 1:
            return f"{float(value):.2f}"  # the tiny models: 0.1 GFLOPs would hide the steps
        return f"{float(value):.1f}"
    return latex_escape(str(value))


def fmt_diff(value: float | None) -> str:
    if value is None:
        return "--"
    return f"{value:+.1f}".replace("-", "$-$")


def _grid(cells: list[dict[str, Any]]) -> tuple[list[str], list[str], dict]:
    rows = [c["row"] for c in sorted(cells, key=lambda c: c["row_index"])]
    rows = list(dict.fromkeys(rows))
    columns = list(dict.fromkeys(c["column"] for c in cells))
    by = {(c["row"], c["column"]): c for c in cells}
    return rows, columns, by


def render_table(table_id: str, title: str, cells: list[dict[str, Any]], scale: str) -> str:
    """The booktabs LaTeX of one table (a ``table`` float, for ``\\input``)."""
    rows, columns, by = _grid(cells)
    settings = [c for c in columns if by[(rows[0], c)]["kind"] == "setting"]
    numbers = [c for c in columns if c not in settings]
    wide = len(numbers) > 4  # wider than a landscape page: scale it down
    spec = "l" + "c" * len(settings) + "".join("rrr" for _ in numbers)
    head1 = ["Method"] + [COLUMN_TITLES.get(c, latex_escape(c)) for c in settings]
    head1 += [
        rf"\multicolumn{{3}}{{c}}{{{COLUMN_TITLES.get(c, latex_escape(c))}}}" for c in numbers
    ]
    rules = []
    first = 2 + len(settings)
    for i, _ in enumerate(numbers):
        start = first + 3 * i
        rules.append(rf"\cmidrule(lr){{{start}-{start + 2}}}")
    head2 = [""] * (1 + len(settings)) + ["paper", "ours", r"$\Delta$"] * len(numbers)
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        rf"\caption{{{latex_escape(title)} ({latex_escape(table_id)}; scale \texttt{{{scale}}}"
        + (r": not results" if scale != "paper" else "")
        + r"). Ours: median over seeds; $\Delta$ = ours $-$ paper.}",
        rf"\label{{tab:hcformer-{table_id}}}",
        (r"\resizebox{\textwidth}{!}{%" if wide else r"{%"),
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(head1) + r" \\",
        "".join(rules),
        " & ".join(head2) + r" \\",
        r"\midrule",
    ]
    footnotes = set()
    for row in rows:
        quoted = by[(row, columns[0])]["quoted"]
        label = latex_escape(row) + (r" \textit{(quoted)}" if quoted else "")
        if quoted:
            footnotes.add("quoted")
        out = [label]
        for column in settings:
            out.append(fmt(by[(row, column)]["paper"], column))
        for column in numbers:
            cell = by[(row, column)]
            out.append(fmt(cell["paper"], column))
            status = cell["status"]
            if status in ("ok", "partial"):
                ours = fmt(cell["ours"], column)
                if status == "partial":
                    ours += r"$^\dagger$"
                    footnotes.add("partial")
                out += [ours, fmt_diff(cell["diff"])]
            else:
                out += [STATUS_MARKS.get(status, latex_escape(status)), "--"]
                if status in STATUS_MARKS:
                    footnotes.add(status)
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}"]
    notes = []
    if "quoted" in footnotes:
        notes.append("\\textit{quoted}: the paper quotes this row from another paper; not trained")
    if "partial" in footnotes:
        notes.append(r"$^\dagger$ median of fewer seeds than expected")
    if "missing" in footnotes or "failed" in footnotes:
        notes.append(r"\textit{missing}/\textit{failed}: the runs have no metrics yet")
    if "not_built" in footnotes:
        notes.append(r"\textit{not built}: the model is not part of this build yet")
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " + "; ".join(notes) + ".}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Macros.

_DIGITS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def macro_word(text: str) -> str:
    """Letters only, CamelCase: ``HCFormer R50 L3`` -> ``HCFormerRFiveZeroLThree``."""
    text = str(text).replace("+", " Plus ").replace("-", " ")
    words = re.findall(r"[A-Za-z]+|\d", text)
    out = []
    for word in words:
        if word.isdigit():
            out.append(_DIGITS[int(word)])
        else:
            out.append(word[0].upper() + word[1:])
    return "".join(out)


def table_word(table_id: str) -> str:
    rest = table_id.removeprefix("table")
    number, _, part = rest.partition("_")
    if number.isdigit():
        number = _DIGITS[int(number)] if len(number) == 1 else macro_word(number)
    else:
        number = "Roman" + number  # tableII -> RomanII
    return "Table" + number + macro_word(part)


def macros_for(cells: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(macro name, LaTeX value)`` for every number of a table (paper, ours, diff, n)."""
    out = []
    for cell in cells:
        if cell["kind"] == "setting":
            continue
        base = (
            "hc" + table_word(cell["table"]) + macro_word(cell["row"]) + macro_word(cell["column"])
        )
        out.append((base + "Paper", fmt(cell["paper"], cell["column"])))
        if cell["status"] in ("ok", "partial"):
            ours = fmt(cell["ours"], cell["column"])
            out.append((base + "Ours", ours))
            out.append((base + "Diff", fmt_diff(cell["diff"])))
            if cell["kind"] == "metric":
                out.append((base + "Min", fmt(cell["min"], cell["column"])))
                out.append((base + "Max", fmt(cell["max"], cell["column"])))
                out.append((base + "Seeds", str(cell["n"])))
        else:
            mark = STATUS_MARKS.get(cell["status"], latex_escape(cell["status"]))
            out.append((base + "Ours", mark))
            out.append((base + "Diff", "--"))
    return out


def render_macros(all_cells: list[list[dict[str, Any]]], scale: str) -> str:
    lines = [
        f"% Numbers of the HCFormer reproduction at scale {scale} (generated by hcformer tables;",
        "% \\input this file). One macro per number: <table><row><column><Paper|Ours|Diff|Min|Max|Seeds>.",
    ]
    seen: dict[str, str] = {}
    for cells in all_cells:
        for name, value in macros_for(cells):
            if name in seen:
                raise HCFormerError(f"macro \\{name} would be defined twice (rename a row)")
            seen[name] = value
            lines.append(f"\\newcommand{{\\{name}}}{{{value}}}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Provenance and PDF.


def provenance(
    table_id: str, title: str, cells: list[dict[str, Any]], scale: str
) -> dict[str, Any]:
    out_cells = []
    for cell in cells:
        entry = {
            "row": cell["row"],
            "column": cell["column"],
            "kind": cell["kind"],
            "status": cell["status"],
            "paper": cell["paper"],
            "ours": cell["ours"],
            "min": cell["min"],
            "max": cell["max"],
            "n": cell["n"],
            "n_expected": cell["n_expected"],
        }
        if cell["status"] == "quoted" or (cell["quoted"] and cell["kind"] == "setting"):
            entry["quoted_from"] = cell["source"]
        if cell["kind"] == "setting":
            entry["from"] = "the paper's table (a setting of the row)"
        entry["runs"] = cell["runs"]
        out_cells.append(entry)
    return {
        "table": table_id,
        "title": title,
        "scale": scale,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "paper": "arXiv:2205.09949v3 (experiments/paper_values.yaml)",
        "cells": out_cells,
    }


def compile_pdf(tex_files: list[Path], out: Path, title: str) -> Path:
    """Every table in one PDF (pdflatex run twice in a temporary folder)."""
    if shutil.which("pdflatex") is None:
        raise HCFormerError("pdflatex is not installed (Debian: texlive-latex-recommended)")
    body = r"\begin{center}\Large " + latex_escape(title) + r"\end{center}"
    inputs = "\n\\clearpage\n".join(Path(t).read_text() for t in tex_files)
    document = PREAMBLE + body + "\n" + inputs + "\n\\end{document}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tables.tex"
        src.write_text(document)
        for _ in range(2):
            proc = subprocess.run(
                ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", src.name],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if proc.returncode != 0:
                tail = "\n".join(proc.stdout.splitlines()[-15:])
                raise HCFormerError(f"pdflatex failed on {out}:\n{tail}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "tables.pdf", out)
    return out


# --------------------------------------------------------------------------------------
# `hcformer tables`


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hcformer tables",
        description="LaTeX tables, provenance, macros and a PDF from the aggregated cells.",
    )
    parser.add_argument(
        "--results", required=True, help="a scale's results root, e.g. results/smoke"
    )
    parser.add_argument("--scale", required=True, choices=("smoke", "tiny", "paper"))
    parser.add_argument(
        "--table", action="append", default=[], help="write this table (repeatable)"
    )
    parser.add_argument(
        "--macros", action="store_true", help="write RESULTS/macros.tex (all tables)"
    )
    parser.add_argument(
        "--pdf", action="store_true", help="compile RESULTS/tables.pdf (all tables)"
    )
    args = parser.parse_args(argv)
    from hcformer.experiments import load_table, load_tables

    results = Path(args.results)
    if not (args.table or args.macros or args.pdf):
        raise HCFormerError("give --table ID, --macros or --pdf")
    for table_id in args.table:
        table = load_table(table_id)
        cells = read_cells(results / "aggregate" / f"{table_id}.csv")
        _write(
            results / "tables" / f"{table_id}.tex",
            render_table(table_id, table.title, cells, args.scale),
        )
        prov = provenance(table_id, table.title, cells, args.scale)
        _write(results / "provenance" / f"{table_id}.json", json.dumps(prov, indent=1) + "\n")
        print(f"hcformer tables: {results / 'tables' / (table_id + '.tex')}")
    all_ids = [t.id for t in load_tables()]
    if args.macros:
        all_cells = [read_cells(results / "aggregate" / f"{t}.csv") for t in all_ids]
        _write(results / "macros.tex", render_macros(all_cells, args.scale))
        print(f"hcformer tables: {results / 'macros.tex'}")
    if args.pdf:
        texs = [results / "tables" / f"{t}.tex" for t in all_ids]
        absent = [str(t) for t in texs if not t.exists()]
        if absent:
            raise HCFormerError(f"no table file {absent[0]} (run hcformer tables --table first)")
        title = f"HCFormer reproduction: every table, scale {args.scale}"
        compile_pdf(texs, results / "tables.pdf", title)
        print(f"hcformer tables: {results / 'tables.pdf'}", file=sys.stderr)
    return 0
