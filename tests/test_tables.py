"""``hcformer tables``: booktabs LaTeX that compiles, macros, provenance, the PDF of all tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hcformer import cli
from hcformer.analysis.tables import (
    COLUMN_PT,
    MINUS,
    TEXT_PT,
    fmt,
    fmt_diff,
    latex_escape,
    macro_word,
    table_word,
)
from hcformer.experiments import load_table, load_tables

needs_pdflatex = pytest.mark.skipif(
    shutil.which("pdflatex") is None, reason="pdflatex not installed"
)


def compile_latex(tmp_path: Path, body: str, preamble: str = "") -> subprocess.CompletedProcess:
    doc = (
        "\\documentclass{article}\n\\usepackage[landscape,margin=1cm]{geometry}\n"
        "\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
        + preamble
        + "\\begin{document}\n"
        + body
        + "\n\\end{document}\n"
    )
    (tmp_path / "doc.tex").write_text(doc)
    return subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def table5(tmp_path, fill_table, aggregate):
    results = tmp_path / "smoke"
    table = load_table("table5")
    skip = {table.rows[-1].runs[0].experiment_id}  # the L3 row has no runs: marked missing
    fill_table(results, "table5", lambda e, s: {"pq": 40.0 + s}, skip=skip)
    aggregate(results, "table5")
    assert (
        cli.main(["tables", "--results", str(results), "--scale", "smoke", "--table", "table5"])
        == 0
    )
    return results


def test_table_tex_has_the_papers_layout_values_and_marks(table5, paper_values):
    tex = (table5 / "tables" / "table5.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
    lines = [ln for ln in body.strip().splitlines() if ln.strip()]
    labels = [r.label for r in load_table("table5").rows]
    assert [ln.split(" & ")[0] for ln in lines] == labels  # the paper's rows, in its order
    paper = paper_values("table5")
    l0 = lines[0].split(" & ")
    # Method, Level, then (paper, ours, diff) for pq, gflops, params_m
    assert l0[1] == "0" and l0[2] == f"{paper[labels[0]]['pq']:.1f}" and l0[3] == "41.0"
    assert l0[4] == f"{41.0 - paper[labels[0]]['pq']:+.1f}".replace("-", MINUS)  # math minus
    assert l0[5] == str(paper[labels[0]]["gflops"]) == "82"  # the paper's integer, as printed
    # A missing run: one mark over its ours and difference.
    assert lines[-1].split(" & ")[3] == "\\multicolumn{2}{c}{\\textit{missing}}"
    assert "not results" in tex  # a smoke table says so in its caption
    assert "\\resizebox" not in tex


def test_column_titles_are_those_of_columns_yaml(table5, tmp_path, monkeypatch):
    """The header titles each column as experiments/columns.yaml says (the one list of titles):
    a title changed there is the title printed."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    described = yaml.safe_load((root / "columns.yaml").read_text())["columns"]

    def header() -> str:
        return (table5 / "tables" / "table5.tex").read_text().split("\\toprule\n")[1]

    titles = [described[c]["latex"] for c in load_table("table5").columns]
    assert header().startswith(
        f"Method & {titles[0]} & "
        + " & ".join(f"\\multicolumn{{3}}{{c}}{{{t}}}" for t in titles[1:])
    )
    shutil.copytree(root, tmp_path / "experiments")
    path = tmp_path / "experiments" / "columns.yaml"
    path.write_text(path.read_text().replace("latex: Level,", "latex: Hierarchy level,"))
    monkeypatch.setenv("HCFORMER_EXPERIMENTS", str(tmp_path / "experiments"))
    argv = ["tables", "--results", str(table5), "--scale", "smoke", "--table", "table5"]
    assert cli.main(argv) == 0
    assert header().startswith("Method & Hierarchy level & ")


def test_provenance_names_the_runs_of_every_cell(table5):
    prov = json.loads((table5 / "provenance" / "table5.json").read_text())
    assert prov["table"] == "table5" and prov["scale"] == "smoke"
    cells = {(c["row"], c["column"]): c for c in prov["cells"]}
    cell = cells[("HCFormer R50 L1", "pq")]
    assert cell["ours"] == 41.0 and cell["n"] == 3
    assert [(r["experiment"], r["seed"]) for r in cell["runs"]] == [
        (load_table("table5").row("HCFormer R50 L1").runs[0].experiment_id, s) for s in (0, 1, 2)
    ]
    assert all(set(r) >= {"mlflow_run_id", "git_commit", "value"} for r in cell["runs"])
    assert cells[("HCFormer R50 L3", "pq")]["status"] == "missing"


@needs_pdflatex
def test_every_table_compiles_and_macros_define_each_number_once(tmp_path, fill_table, aggregate):
    results = tmp_path / "smoke"
    for table in load_tables():
        fill_table(
            results, table.id, lambda e, s: {"pq": 1.0, "miou": 2.0, "ap": 3.0, "pixel_acc": 4.0}
        )
        aggregate(results, table.id)
    ids = [t.id for t in load_tables()]
    argv = ["tables", "--results", str(results), "--scale", "smoke", "--macros", "--pdf"]
    assert cli.main([*argv] + [x for t in ids for x in ("--table", t)]) == 0
    pdf = results / "tables.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 10_000
    macros = (results / "macros.tex").read_text()
    names = re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", macros)
    assert len(names) == len(set(names)) > 500
    assert "hcTableFiveHCFormerRFiveZeroLThreePqPaper" in names
    # A manuscript can \input the macros and use one: and its value is the paper's number.
    used = "\\hcTableFiveHCFormerRFiveZeroLThreePqPaper{} and \\hcTableRomanIVHCFormerRFiveZeroQTwoZeroCocoPqOurs{}"
    proc = compile_latex(tmp_path, f"\\input{{{results / 'macros.tex'}}}\n{used}")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "\\newcommand{\\hcTableFiveHCFormerRFiveZeroLThreePqPaper}{47.7}" in macros
    assert "\\newcommand{\\hcTableRomanIVHCFormerRFiveZeroQTwoZeroCocoPqOurs}{1.0}" in macros
    # Each table compiles on its own too (\input into a document).
    proc = compile_latex(tmp_path, f"\\input{{{results / 'tables' / 'table1.tex'}}}")
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_names_and_escapes():
    assert macro_word("HCFormer+ R50 L3") == "HCFormerPlusRFiveZeroLThree"
    assert macro_word("ap_th_pan") == "ApThPan"
    assert table_word("table5") == "TableFive" and table_word("tableI_a") == "TableRomanIA"
    assert latex_escape("a_b & 50% #1") == "a\\_b \\& 50\\% \\#1"


def test_tables_without_aggregate_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["tables", "--results", str(tmp_path), "--scale", "smoke", "--table", "table5"])
    assert code == 2
    assert "no such aggregate file" in capsys.readouterr().err


def test_numbers_print_as_the_paper_prints_them():
    assert fmt(37, "params_m") == "37" and fmt(3692, "gflops") == "3692"  # integers stay so
    assert fmt(37.0, "params_m") == "37.0" and fmt(41.94, "pq") == "41.9"  # ours: one decimal
    assert fmt(0.123, "gflops") == "0.12"  # the tiny models
    assert fmt(-2.04, "pq") == MINUS + "2.0" and fmt(-3, "pq") == MINUS + "3"
    assert fmt_diff(-1.04) == MINUS + "1.0" and fmt_diff(0.04) == "+0.0" and fmt_diff(None) == "--"
    # COCO's -1 (-100 in percent): "no object of this size", an en dash, never a number.
    assert fmt(-100.0, "ap_s") == fmt(-1.0, "ap_l") == fmt(-100.0, "ap_boundary") == "--"
    assert fmt(-100.0, "pq") == MINUS + "100.0"  # only COCO's AP/AR columns mean that
    assert fmt(3, "hierarchy_level") == "3" and fmt(True, "dcnv2") == "yes"


METRICS = {
    "pq": 45.67, "pq_th": 52.1, "pq_st": 38.2, "ap_th_pan": 30.1, "miou_pan": 55.5,
    "ap": 37.4, "ap_s": -100.0, "ap_m": 40.0, "ap_l": 59.7, "ap_boundary": 24.6,
    "miou": 47.2, "pixel_acc": 81.2,
}  # fmt: skip


@pytest.fixture(scope="module")
def every_table(tmp_path_factory, fill_table, aggregate):
    """Every table from a fake tree at its widest: COCO's -1 for AP_S (the smoke images have no
    small objects), a run missing in each table, a seed whose folder has no metrics and no live
    job (failed: double daggers), four-digit profile numbers with four-digit differences."""
    results = tmp_path_factory.mktemp("tables") / "smoke"
    ids = []
    for table in load_tables():
        exps = [run.experiment_id for row in table.rows for run in row.runs]

        def value(exp, seed, first=exps[0] if exps else None):
            return None if (exp == first and seed == 2) else METRICS

        fill_table(results, table.id, value, skip=set(exps[-1:]))
        profile = results / "profile" / f"{table.id}.json"
        profile.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"label": r.label, "params_m": 215.27, "gflops": 1234.5, "latency_ms": 123.4}
                for r in table.rows]  # fmt: skip
        profile.write_text(json.dumps({"rows": rows}))
        aggregate(results, table.id, "--profile", str(profile))
        ids.append(table.id)
    argv = ["tables", "--results", str(results), "--scale", "smoke", "--macros"]
    assert cli.main(argv + [x for t in ids for x in ("--table", t)]) == 0
    return results, ids


def _numbers_of(tex: str) -> list[str]:
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
    return [
        c.strip() for ln in body.splitlines() for c in ln.removesuffix(" \\\\").split(" & ")[1:]
    ]


def test_coco_no_object_is_a_dash_and_every_minus_is_a_math_minus(every_table):
    results, ids = every_table
    tex = (results / "tables" / "table2.tex").read_text()
    assert "100.0" not in tex and "116.7" not in tex  # no -100.0 and no Delta of -116.7
    assert "no object of this size" in tex  # the dash is explained
    macros = (results / "macros.tex").read_text()
    assert "\\newcommand{\\hcTableTwoHCFormerRFiveZeroApSOurs}{--}" in macros
    assert "\\newcommand{\\hcTableTwoHCFormerRFiveZeroApSDiff}{--}" in macros
    assert "\\newcommand{\\hcTableTwoHCFormerRFiveZeroApSPaper}{16.7}" in macros
    assert "\\newcommand{\\hcTableTwoHCFormerRFiveZeroGflopsPaper}{87}" in macros
    number = re.compile(r"^(--|[+]?(\\ensuremath\{-\})?\d+(\.\d+)?(\$\^\\d?dagger\$)?)$")
    for table in ids:
        cells = _numbers_of((results / "tables" / f"{table}.tex").read_text())
        for cell in cells:
            assert "-" not in cell.replace("--", "").replace(MINUS, ""), (table, cell)
            assert number.match(cell) or cell in ("", "yes", "no") or "textit" in cell, (
                table,
                cell,
            )
    # Paper integers print as integers: Table 1's MaX-DeepLab (451 M, 3692 GFLOPs).
    assert " & 451 & 3692 \\\\" in (results / "tables" / "table1.tex").read_text()


@needs_pdflatex
def test_every_table_fits_a_two_column_paper(every_table, tmp_path):
    """CI compiles every table in a two-column article: no overfull box (a table wider than its
    column or page), no scaling; narrow tables take a column, wide ones the page."""
    results, ids = every_table
    texs = {t: (results / "tables" / f"{t}.tex").read_text() for t in ids}
    assert not any("\\resizebox" in tex or "\\scalebox" in tex for tex in texs.values())
    floats = {t: re.search(r"\\begin\{(table\*?)\}", tex).group(1) for t, tex in texs.items()}
    assert floats["table1"] == floats["table5"] == "table*"  # 7 and 3 number columns
    assert floats["table4"] == "table"  # GFLOPs and mIoU: a column
    inputs = "\n".join(f"\\input{{{results / 'tables' / t}.tex}}" for t in ids)
    doc = (
        "\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        "\\typeout{WIDTHS \\the\\columnwidth\\space\\the\\textwidth}\n"
        f"\\input{{{results / 'macros.tex'}}}\n{inputs}\n\\end{{document}}\n"
    )
    (tmp_path / "paper.tex").write_text(doc)
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    # The widths the tables are laid out for are this document's.
    column, text = re.search(r"WIDTHS ([\d.]+)pt ([\d.]+)pt", log).groups()
    assert (float(column), float(text)) == (COLUMN_PT, TEXT_PT)
    overfull = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert not [w for w in overfull if w > 2.0], overfull


def test_the_results_readme_shows_coco_no_object_as_the_tables_do(every_table):
    """COCO's -1 (-100 in percent: no object of this size) is an en dash with a note in the
    results README too, never -100.0; and it takes no part in the ablations' orderings."""
    results, _ = every_table
    assert cli.main(["report", "--results", str(results), "--scale", "smoke"]) == 0
    readme = (results / "README.md").read_text()
    assert "-100" not in readme
    table2 = readme.split("### table2:")[1].split("###")[0]
    lines = table2.strip().splitlines()
    ap_s = next(ln for ln in lines if ln.startswith("| row |")).split(" | ").index("ap_s")
    (ours,) = [ln for ln in lines if ln.startswith("| HCFormer R50 | ")]
    assert ours.split(" | ")[ap_s] == "– (16.7)"  # ours: COCO's -1; the paper's 16.7
    assert ours.split(" | ")[ap_s - 1] == "37.4‡ (37.4)"  # AP: a seed of it failed
    assert "– (AP): no object of this size in the evaluation images (COCO's -1)." in table2
