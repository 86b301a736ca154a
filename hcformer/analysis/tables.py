"""``hcformer tables``: the paper's tables as booktabs LaTeX, macros, provenance and a PDF.

From a table's cells (``hcformer aggregate``; ``<results>/aggregate/<table>.csv``):

- ``tables/<table>.tex``: a float in the paper's layout (its rows and columns, in its order)
  that fits a two-column paper unscaled: a ``table`` in a column when it fits there, else a
  ``table*`` across the page, at the largest font size that fits (widths measured from the
  cells' text with Computer Modern's metrics); each number column shows the paper's value, ours
  (median of the seeds) and the difference, side by side or stacked; rows the paper quotes from
  other papers are marked as quoted (never trained); runs that are missing, failed or not built
  yet are marked so, never dropped; a median of fewer seeds than expected carries a dagger
  (a double dagger when a seed failed);
  COCO's -1 (no object of this size) is an en dash; negative numbers have a math minus;
- ``provenance/<table>.json``: for every cell, the runs it came from (experiment, seed, value,
  MLflow run id, git commit) or the profile file, or the paper quoted;
- ``macros.tex`` (``--macros``): one macro per number of every table, e.g.
  ``\\hcTableFiveHCFormerRFiftyLThreePqOurs``, so a manuscript can ``\\input`` it;
- ``tables.pdf`` (``--pdf``): every table in one two-column document, compiled with pdflatex.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError
from hcformer.experiments import columns

STATUS_MARKS = {
    "missing": r"\textit{missing}",
    "failed": r"\textit{failed}",
    "running": r"\textit{running}",
    "not_built": r"\textit{not built}",
    "no_metric": r"\textit{n/a}",
    "quoted": r"\textit{quoted}",
}
# A two-column page as a paper has (article's own widths: COLUMN_PT and TEXT_PT below).
PREAMBLE = r"""\documentclass[10pt,twocolumn]{article}
\usepackage{booktabs}
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


MINUS = r"\ensuremath{-}"  # a math minus in text and in math mode (a hyphen is not a minus)
# COCO's summary prints -1 (here -100, in percent) for "no object of this size" (e.g. AP_S on
# images without small objects): not a number, shown as an en dash.
COCO_COLUMNS = ("ap", "ar")


def title(column: str) -> str:
    """A column's LaTeX title (experiments/columns.yaml; an unknown key as itself, escaped)."""
    known = columns().get(column)
    return known.latex if known else latex_escape(column)


def _is_setting(column: str) -> bool:
    known = columns().get(column)
    return known is not None and known.kind == "setting"


def _signed(text: str) -> str:
    return MINUS + text[1:] if text.startswith("-") else text


def no_objects(value: Any, column: str) -> bool:
    """Whether ``value`` is COCO's -1 ("no object of this size") of an AP/AR column."""
    return (
        column.split("_")[0] in COCO_COLUMNS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value < 0
    )


def fmt(value: Any, column: str = "") -> str:
    """A number as the paper prints it: the paper's integers and the settings of a row as
    integers (37, 3692), else one decimal (two below 1 for params/GFLOPs of the tiny models); a
    math minus; COCO's -1 and an absent value as an en dash."""
    if value is None or value == "" or no_objects(value, column):
        return "--"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and _is_setting(column)):
        return _signed(str(int(value)))
    if isinstance(value, float):
        if column in ("params_m", "gflops") and 0 < abs(value) < 1:
            return f"{value:.2f}"  # the tiny models: 0.1 GFLOPs would hide the steps
        return _signed(f"{value:.1f}")
    return latex_escape(str(value))


def fmt_diff(value: float | None) -> str:
    if value is None:
        return "--"
    text = f"{value:+.1f}"
    return _signed(text) if text.startswith("-") else text


def _diff_text(cell: dict[str, Any]) -> str:
    if no_objects(cell["ours"], cell["column"]) or no_objects(cell["paper"], cell["column"]):
        return "--"
    return fmt_diff(cell["diff"])


def _grid(cells: list[dict[str, Any]]) -> tuple[list[str], list[str], dict]:
    rows = [c["row"] for c in sorted(cells, key=lambda c: c["row_index"])]
    rows = list(dict.fromkeys(rows))
    columns = list(dict.fromkeys(c["column"] for c in cells))
    by = {(c["row"], c["column"]): c for c in cells}
    return rows, columns, by


# --------------------------------------------------------------------------------------
# Widths: every table must fit a two-column paper (a column, else the page), without scaling.

# Widths in pt of Computer Modern Roman at 10 pt (cmr10's metrics, rounded up); other
# characters count as an upper-case letter. Smaller sizes scale by their design size, plus a
# margin (cmr8 is relatively wider than cmr10).
_CHAR_PT = {**dict.fromkeys("0123456789", 5.0), **dict.fromkeys(".,:;!'", 2.8)}
_CHAR_PT.update({" ": 3.4, "(": 3.9, ")": 3.9, "/": 5.0, "-": 3.4, "+": 7.8, "=": 7.8})
_CHAR_PT.update(dict.fromkeys("ijlt", 2.8) | dict.fromkeys("fr", 3.9) | {"m": 8.4, "w": 7.3})
_LOWER_PT, _UPPER_PT = 5.3, 7.6
_MACRO_PT = {
    MINUS: 7.8,
    r"$^\dagger$": 3.4,
    r"$^\ddagger$": 3.4,
    r"$\Delta$": 8.4,
    r"\#": 8.4,
    "--": 5.0,
    r"\textasciitilde{}": 5.0,
}
SIZES = {"small": 0.93, "footnotesize": 0.86, "scriptsize": 0.78}  # vs 10 pt, with a margin
TABCOLSEP_PT = 4.0
# \columnwidth and \textwidth of a two-column article at 10 pt (a conference template is close).
COLUMN_PT, TEXT_PT = 229.5, 469.0


def text_width(latex: str) -> float:
    """An upper bound of the natural width (pt, 10 pt Computer Modern) of a cell's LaTeX."""
    text, width = latex, 0.0
    for macro, pt in _MACRO_PT.items():
        width += text.count(macro) * pt
        text = text.replace(macro, "")
    # Sub- and superscripts are set at 70%.
    for script in re.findall(r"\\text(?:super|sub)script\{([^}]*)\}", text):
        width += 0.7 * text_width(script)
    text = re.sub(r"\\text(?:super|sub)script\{[^}]*\}", "", text)
    text = re.sub(r"\\[A-Za-z]+\*?", "", text).replace("{", "").replace("}", "")
    text = text.replace("\\", "").replace("$", "")
    for ch in text:
        if ch in _CHAR_PT:
            width += _CHAR_PT[ch]
        else:
            width += _LOWER_PT if ch.islower() else _UPPER_PT
    return width


def tabular_width(lines: list[list[tuple[str, int]]], n_columns: int, size: float) -> float:
    """The natural width (pt) of a tabular of ``lines`` of (cell LaTeX, columns spanned)."""
    widths = [0.0] * n_columns
    spans = []
    for line in lines:
        col = 0
        for text, span in line:
            w = text_width(text) * size
            if span == 1:
                widths[col] = max(widths[col], w)
            else:
                spans.append((col, span, w))
            col += span
    for col, span, w in spans:  # a spanning cell widens its last column if it needs to
        inside = sum(widths[col : col + span]) + 2 * TABCOLSEP_PT * (span - 1)
        widths[col + span - 1] += max(0.0, w - inside)
    return sum(widths) + 2 * TABCOLSEP_PT * n_columns


# Where a table goes, in order of preference: a column of the page (its own layout, then the
# stacked one), else across the page. \scriptsize is too small to read beside the text.
PLACES = (
    ("table", COLUMN_PT, ("small", "footnotesize")),
    ("table*", TEXT_PT, ("small", "footnotesize", "scriptsize")),
)


def fit(layouts: list[tuple[Any, int, list]]) -> tuple[int, str, str]:
    """The first (layout index, float, font size) at which a tabular fits, never scaled: a
    column of a two-column paper (``table``), else the page (``table*``). ``layouts``: (name,
    number of columns, lines of (cell LaTeX, columns spanned))."""
    for env, room, sizes in PLACES:
        for size in sizes:
            for i, (_, n_columns, lines) in enumerate(layouts):
                if tabular_width(lines, n_columns, SIZES[size]) <= room:
                    return i, env, size
    return len(layouts) - 1, "table*", "scriptsize"


def _row_label(row: str, quoted: bool) -> str:
    return latex_escape(row) + (r"$^{q}$" if quoted else "")


def failed_seeds(cell: dict[str, Any]) -> int:
    """How many of a cell's runs failed (``hcformer aggregate`` lists each with its status)."""
    return sum(run.get("status") == "failed" for run in cell["runs"])


def _ours(cell: dict[str, Any], footnotes: set[str]) -> str | None:
    """Our value of a cell (with a dagger when partial, a double dagger when a seed of it
    failed), or None when it has no number."""
    if cell["status"] not in ("ok", "partial"):
        if cell["status"] in STATUS_MARKS:
            footnotes.add(cell["status"])
        return None
    ours = fmt(cell["ours"], cell["column"])
    if no_objects(cell["ours"], cell["column"]):
        footnotes.add("no_objects")
        return ours
    if cell["status"] == "partial" and failed_seeds(cell):
        ours += r"$^\ddagger$"
        footnotes.add("partial_failed")
    elif cell["status"] == "partial":
        ours += r"$^\dagger$"
        footnotes.add("partial")
    return ours


def _mark(cell: dict[str, Any]) -> str:
    return STATUS_MARKS.get(cell["status"], latex_escape(cell["status"]))


def _paper_line(row, row_columns, shown, by, footnotes):
    """Whether a row (of ``row_columns``) is quoted, and its first line: its label and the
    paper's values of the columns ``shown``."""
    quoted = by[(row, row_columns[0])]["quoted"]
    if quoted:
        footnotes.add("quoted")
    line = [(_row_label(row, quoted), 1)]
    return quoted, line + [(fmt(by[(row, c)]["paper"], c), 1) for c in shown]


def _triple_layout(rows, settings, numbers, by, footnotes):
    """Paper, ours and the difference side by side for each number column."""
    head1 = [("Method", 1)] + [(title(c), 1) for c in settings]
    head1 += [(title(c), 3) for c in numbers]
    head2 = [("", 1)] * (1 + len(settings)) + [("paper", 1), ("ours", 1), (r"$\Delta$", 1)] * len(
        numbers
    )
    first = 2 + len(settings)
    rules = "".join(
        rf"\cmidrule(lr){{{first + 3 * i}-{first + 3 * i + 2}}}" for i in range(len(numbers))
    )
    body = []
    for row in rows:
        _, line = _paper_line(row, settings + numbers, settings, by, footnotes)
        for column in numbers:
            cell = by[(row, column)]
            if no_objects(cell["paper"], column):
                footnotes.add("no_objects")
            line.append((fmt(cell["paper"], column), 1))
            ours = _ours(cell, footnotes)
            if ours is None:  # a mark over ours and the difference
                line.append((_mark(cell), 2))
            else:
                line += [(ours, 1), (_diff_text(cell), 1)]
        body.append(line)
    n_columns = 1 + len(settings) + 3 * len(numbers)
    spec = "l" + "c" * len(settings) + "r" * (3 * len(numbers))
    return spec, n_columns, [head1, head2], rules, body


def _stacked_layout(rows, settings, numbers, by, footnotes):
    """A column per number, as the paper prints it: the paper's line of a row, then a line of
    ours and one of the difference below it (quoted rows have neither)."""
    head = [("Method", 1)] + [(title(c), 1) for c in settings + numbers]
    body = []
    for row in rows:
        quoted, line = _paper_line(row, settings + numbers, settings + numbers, by, footnotes)
        body.append(line)
        if quoted:
            continue
        ours_line = [(r"\quad ours", 1)] + [("", 1)] * len(settings)
        diff_line = [(r"\quad $\Delta$", 1)] + [("", 1)] * len(settings)
        for column in numbers:
            cell = by[(row, column)]
            ours = _ours(cell, footnotes)
            ours_line.append((_mark(cell) if ours is None else ours, 1))
            diff_line.append(("--" if ours is None else _diff_text(cell), 1))
        body += [ours_line, diff_line]
    n_columns = 1 + len(settings) + len(numbers)
    spec = "l" + "c" * len(settings) + "r" * len(numbers)
    return spec, n_columns, [head], "", body


def _latex_line(line: list[tuple[str, int]]) -> str:
    out = []
    for text, span in line:
        out.append(text if span == 1 else rf"\multicolumn{{{span}}}{{c}}{{{text}}}")
    return " & ".join(out) + r" \\"


def render_table(table_id: str, title: str, cells: list[dict[str, Any]], scale: str) -> str:
    """The booktabs LaTeX of one table, for ``\\input``: a ``table`` float when it fits a column
    of a two-column paper, else a ``table*`` across the page, at the largest font size that
    fits (widths measured from its cells, never scaled); paper, ours and the difference side by
    side, or stacked when that is what fits."""
    rows, columns, by = _grid(cells)
    settings = [c for c in columns if by[(rows[0], c)]["kind"] == "setting"]
    numbers = [c for c in columns if c not in settings]
    built = []
    for layout in (_triple_layout, _stacked_layout):
        footnotes: set[str] = set()
        built.append((*layout(rows, settings, numbers, by, footnotes), footnotes))
    choice, env, size = fit([(b[0], b[1], b[2] + b[4]) for b in built])
    spec, n_columns, heads, rules, body, footnotes = built[choice]
    lines = [
        rf"\begin{{{env}}}[htbp]",
        r"\centering",
        rf"\{size}",
        rf"\setlength{{\tabcolsep}}{{{TABCOLSEP_PT:g}pt}}",
        rf"\caption{{{latex_escape(title)} ({latex_escape(table_id)}; scale \texttt{{{scale}}}"
        + (r": not results" if scale != "paper" else "")
        + r"). Ours: median over seeds; $\Delta$ = ours $-$ paper.}",
        rf"\label{{tab:hcformer-{table_id}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
    ]
    for i, head in enumerate(heads):
        lines.append(_latex_line(head))
        if i == 0 and rules:
            lines.append(rules)
    lines.append(r"\midrule")
    lines += [_latex_line(line) for line in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [text for key, text in FOOTNOTES.items() if key in footnotes]
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " + "; ".join(notes) + ".}")
    lines.append(rf"\end{{{env}}}")
    return "\n".join(lines) + "\n"


# The note under a table for each mark its cells use, in the order they are printed.
FOOTNOTES = {
    "quoted": "$^{q}$ quoted by the paper from another paper; not trained",
    "partial": r"$^\dagger$ median of fewer seeds than expected",
    "partial_failed": r"$^\ddagger$ median of the seeds that finished; another seed failed",
    "no_objects": "-- no object of this size in the evaluation images",
    "missing": r"\textit{missing}: not run (or not profiled) yet",
    "running": r"\textit{running}: no seed has finished yet",
    "failed": r"\textit{failed}: a run failed and no seed has finished",
    "not_built": r"\textit{not built}: the model is not part of this build yet",
    "no_metric": r"\textit{n/a}: the runs do not report this metric",
}

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
            out.append((base + "Diff", _diff_text(cell)))
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
