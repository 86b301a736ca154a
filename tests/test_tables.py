"""``hcformer tables``: booktabs LaTeX that compiles, macros, provenance, the PDF of all tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_aggregate import aggregate, fill_table, paper_values

from hcformer import cli
from hcformer.analysis.tables import latex_escape, macro_word, table_word
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
def table5(tmp_path):
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


def test_table_tex_has_the_papers_layout_values_and_marks(table5):
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
    assert l0[4] == f"{41.0 - paper[labels[0]]['pq']:+.1f}".replace("-", "$-$")
    assert "\\textit{missing}" in lines[-1].split(" & ")[3]  # ours of the L3 row
    assert "not results" in tex  # a smoke table says so in its caption


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
def test_every_table_compiles_and_macros_define_each_number_once(tmp_path):
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
