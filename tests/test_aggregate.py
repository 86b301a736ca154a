"""``hcformer aggregate``: run folders -> medians per table cell, runs.csv, provenance, MLflow ids.

Stand-in run folders (hand-written metrics.json, run.json: the ``write_run``, ``fill_table`` and
``campaign_tree`` fixtures of tests/conftest.py) under a temporary results root; the expected
numbers are computed here independently (numpy) from the values written, and the paper's values
are read from experiments/paper_values.yaml directly.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hcformer import cli
from hcformer.analysis.aggregate import table_cells
from hcformer.experiments import all_experiments, load_table, load_tables


def test_medians_min_max_n_and_paper_values(tmp_path, paper_values, fill_table, aggregate):
    results = tmp_path / "smoke"
    rng = np.random.default_rng(0)
    written = fill_table(
        results, "table5", lambda e, s: {"pq": float(rng.uniform(10, 60)), "pq_th": 1.0}
    )
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps({"rows": [{"label": "HCFormer R50 L3", "params_m": 1.25, "gflops": 0.5}]})
    )
    cells = aggregate(results, "table5", "--profile", str(profile))
    paper = paper_values("table5")
    table = load_table("table5")
    assert [c["row"] for c in cells if c["column"] == "pq"] == [r.label for r in table.rows]
    for cell in cells:
        row = table.row(cell["row"])
        assert cell["paper"] == paper[cell["row"]][cell["column"]]
        if cell["column"] == "pq":
            values = [written[(row.runs[0].experiment_id, s)]["pq"] for s in (0, 1, 2)]
            assert cell["ours"] == pytest.approx(float(np.median(values)))
            assert (cell["min"], cell["max"], cell["n"]) == (min(values), max(values), 3)
            assert cell["diff"] == pytest.approx(cell["ours"] - cell["paper"])
            assert cell["status"] == "ok"
            assert [r["seed"] for r in cell["runs"]] == [0, 1, 2]
            assert [r["value"] for r in cell["runs"]] == values
            assert {r["git_commit"] for r in cell["runs"]} == {
                "c0c0c0c0c0",
                "c1c1c1c1c1",
                "c2c2c2c2c2",
            }
        elif cell["column"] == "hierarchy_level":
            assert cell["kind"] == "setting" and cell["ours"] is None
    gflops = {c["row"]: c for c in cells if c["column"] == "gflops"}
    assert gflops["HCFormer R50 L3"]["ours"] == 0.5 and gflops["HCFormer R50 L3"]["status"] == "ok"
    assert gflops["HCFormer R50 L0"]["status"] == "missing"  # not in the profile: marked


def test_missing_partial_failed_runs_are_marked_never_dropped(tmp_path, write_run, aggregate):
    results = tmp_path / "smoke"
    table = load_table("table6")
    ids = [row.runs[0].experiment_id for row in table.rows]
    for seed in (0, 1):
        write_run(results, ids[0], seed, {"pq": 10.0 + seed})  # seed 2 missing: partial
    for seed in (0, 1, 2):
        run = write_run(results, ids[1], seed, None)
        (run / "job.json").write_text(json.dumps({"state": "failed"}))
    cells = {c["row"]: c for c in aggregate(results, "table6") if c["column"] == "pq"}
    assert len(cells) == len(table.rows)
    first, second, third = (cells[r.label] for r in table.rows[:3])
    assert first["status"] == "partial" and first["ours"] == 10.5 and first["n"] == 2
    assert [r["status"] for r in first["runs"]] == ["done", "done", "missing"]
    assert second["status"] == "failed" and second["ours"] is None
    assert third["status"] == "missing" and third["n_expected"] == 3


def test_quoted_rows_and_table_iv_columns_from_three_datasets(tmp_path, fill_table, aggregate):
    results = tmp_path / "smoke"
    per_dataset = {
        "coco_panoptic": {"pq": 30.0},
        "ade20k": {"miou": 40.0},
        "cityscapes": {"miou": 50.0},
    }
    fill_table(
        results, "tableIV", lambda e, s: {k: v + s for k, v in per_dataset[e.split("/")[0]].items()}
    )
    cells = aggregate(results, "tableIV")
    q20 = {c["column"]: c for c in cells if c["row"] == "HCFormer R50 Q20"}
    assert q20["coco_pq"]["ours"] == 31.0 and q20["ade20k_miou"]["ours"] == 41.0
    assert q20["cityscapes_miou"]["ours"] == 51.0
    assert q20["coco_pq"]["runs"][0]["experiment"].startswith("coco_panoptic/")
    assert q20["cityscapes_miou"]["runs"][0]["experiment"].startswith("cityscapes/")

    fill_table(results, "table1", lambda e, s: {"pq": 20.0, "pq_th": 21.0})
    cells = aggregate(results, "table1")
    quoted = {c["row"]: c for c in cells if c["column"] == "pq" and c["quoted"]}
    assert "Mask2Former R50" in quoted and quoted["Mask2Former R50"]["status"] == "quoted"
    assert quoted["Mask2Former R50"]["paper"] == 51.9 and quoted["Mask2Former R50"]["ours"] is None
    assert "Cheng" in quoted["Mask2Former R50"]["source"]
    ours = {c["row"]: c for c in cells if c["column"] == "pq_st" and not c["quoted"]}
    assert ours["HCFormer R50"]["status"] == "no_metric"  # finished runs that do not report it


def test_runs_csv_lists_every_expected_run(tmp_path, write_run):
    results = tmp_path / "smoke"
    write_run(results, "ade20k/hcformer-r50-L3-D8-Q100", 1, {"miou": 12.5, "pixel_acc": 50.0})
    runs_csv, summary_csv = tmp_path / "runs.csv", tmp_path / "summary.csv"
    argv = ["aggregate", "--results", str(results), "--scale", "smoke", "--runs-csv", str(runs_csv)]
    assert cli.main([*argv, "--summary-csv", str(summary_csv)]) == 0
    from hcformer.experiments import all_experiments

    lines = list(csv.DictReader(runs_csv.open()))
    assert len(lines) == 3 * len(all_experiments("smoke"))
    done = [x for x in lines if x["status"] == "done"]
    assert len(done) == 1 and float(done[0]["miou"]) == 12.5 and done[0]["seed"] == "1"
    assert "table3: HCFormer R50" in done[0]["tables"]
    summary = [x for x in csv.DictReader(summary_csv.open()) if x["metric"] == "miou"]
    assert summary[0]["n"] == "1" and float(summary[0]["median"]) == 12.5


def test_mlflow_run_ids_in_provenance(tmp_path, write_run, aggregate):
    """The MLflow run of each folder (its run_dir tag) is named in the cell's provenance."""
    from hcformer.tracking.store import client, ensure_store

    results = tmp_path / "smoke"
    table = load_table("table5")
    exp = table.rows[0].runs[0].experiment_id
    runs = [write_run(results, exp, s, {"pq": float(s)}) for s in (0, 1, 2)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri)
    mlflow = client(uri)
    exp_id = mlflow.create_experiment("hcformer/smoke/coco_panoptic")
    made = {}
    for run in runs[:2]:
        created = mlflow.create_run(exp_id, tags={"run_dir": str(run.resolve())})
        made[run.name] = created.info.run_id
    cells = aggregate(results, "table5", "--mlflow-uri", uri)
    cell = next(c for c in cells if c["row"] == table.rows[0].label and c["column"] == "pq")
    ids = {r["seed"]: r["mlflow_run_id"] for r in cell["runs"]}
    assert ids == {0: made["seed0"], 1: made["seed1"], 2: None}


def test_unknown_table_is_a_clear_error(tmp_path, capsys):
    code = cli.main(
        ["aggregate", "--results", str(tmp_path), "--scale", "smoke", "--table", "table99"]
    )
    assert code == 2
    assert "unknown table 'table99'" in capsys.readouterr().err


def test_cells_function_marks_skipped_parts_not_built(tmp_path):
    table = load_table("tableI_b")
    cells = table_cells(
        table, {}, [0, 1, 2], {}, skipped={r.runs[0].experiment_id for r in table.rows}
    )
    assert {c["status"] for c in cells if c["kind"] == "metric"} == {"not_built"}


# --------------------------------------------------------------------------------------
# Snapshots: every table from the runs finished so far.


def test_snapshot_takes_the_seeds_that_finished_and_marks_the_rest(
    tmp_path, campaign_tree, pq_cells, table5_experiments, capsys
):
    results = tmp_path / "smoke"
    tree = campaign_tree(results)
    argv = ["aggregate", "--results", str(results), "--scale", "smoke", "--snapshot"]
    assert cli.main(argv) == 0
    total = 3 * len(all_experiments("smoke"))
    counts = f"2 of {total} runs done (1 running, 2 failed, {total - 5} missing)"
    assert counts in capsys.readouterr().out
    snap = results / "snapshot"
    labels = [row.label for row in load_table("table5").rows]
    cells = pq_cells(snap / "aggregate" / "table5.csv")
    l0, l1, l2, l3 = (cells[label] for label in labels)
    assert (l0["status"], l0["ours"], l0["n"], l0["n_expected"]) == ("partial", 42.0, 2, 3)
    assert [r["status"] for r in l0["runs"]] == ["done", "done", "failed"]
    assert l0["runs"][2]["reason"] == "job.json: state failed"
    assert l0["runs"][2]["log"].endswith(f"logs/run/{table5_experiments[0]}/seed2.log")
    assert (l1["status"], l1["ours"]) == ("running", None)
    assert str(__import__("os").getpid()) in l1["runs"][0]["reason"]
    assert (l2["status"], l3["status"]) == ("failed", "missing")

    tex = (snap / "tables" / "table5.tex").read_text()
    row = {ln.split(" & ")[0]: ln for ln in tex.splitlines() if " & " in ln}
    assert "42.0$^\\ddagger$" in row["HCFormer R50 L0"]  # the median of the two finished
    assert "\\textit{running}" in row["HCFormer R50 L1"]
    assert "\\textit{failed}" in row["HCFormer R50 L2"]
    assert "\\textit{missing}" in row["HCFormer R50 L3"]
    assert "another seed failed" in tex and "a run failed and no seed has finished" in tex
    prov = json.loads((snap / "provenance" / "table5.json").read_text())
    assert prov["snapshot"]["runs"] == {"done": 2, "failed": 2, "running": 1, "missing": 7}
    readme = (snap / "README.md").read_text()
    assert "A snapshot of the campaign" in readme
    assert f"(2 of {total} runs done, 1 running, 2 failed, {total - 5} not started;" in readme
    assert "| HCFormer R50 L0 | 0 | 42.0‡ (41.9)" in readme
    assert "*running* (45.6)" in readme and "*failed* (46.7)" in readme
    for name in ("macros.tex", "runs.csv", "summary.csv", "figures/table5.pdf"):
        assert (snap / name).is_file(), name
    assert all((snap / "tables" / f"{t.id}.tex").is_file() for t in load_tables())
    states = [x["status"] for x in csv.DictReader((snap / "runs.csv").open())]
    assert (states.count("done"), states.count("failed"), states.count("running")) == (2, 2, 1)
    assert not (results / "tables").exists() and not (results / "aggregate").exists()

    # One more run finishes, the failed one is resumed and finishes: the numbers follow.
    (tree["running"] / "metrics.json").write_text(json.dumps({"pq": 50.0}))
    (tree[table5_experiments[0]] / "metrics.json").write_text(json.dumps({"pq": 47.0}))
    assert cli.main(argv) == 0
    cells = pq_cells(snap / "aggregate" / "table5.csv")
    l0, l1 = cells[labels[0]], cells[labels[1]]
    assert (l0["status"], l0["ours"], l0["n"]) == ("ok", 44.0, 3)
    assert (l1["status"], l1["ours"], l1["n"]) == ("partial", 50.0, 1)
    tex = (snap / "tables" / "table5.tex").read_text()
    assert "50.0$^\\dagger$" in tex and "ddagger" not in tex


def test_one_table_that_cannot_be_built_blocks_no_other(tmp_path, campaign_tree, capsys):
    results = tmp_path / "smoke"
    campaign_tree(results)
    (results / "profile").mkdir(parents=True)
    (results / "profile" / "table6.json").write_text("{not json")
    argv = ["aggregate", "--results", str(results), "--scale", "smoke", "--snapshot"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"snapshot: table6: HCFormerError: {results}/profile/table6.json: not valid JSON" in err
    snap = results / "snapshot"
    built = {p.stem for p in (snap / "tables").glob("*.tex")}
    assert built == {t.id for t in load_tables()} - {"table6"}
    assert "\\hcTableFiveHCFormerRFiveZeroLZeroPqOurs}{42.0}" in (snap / "macros.tex").read_text()
    assert "### table6: " in (snap / "README.md").read_text()
