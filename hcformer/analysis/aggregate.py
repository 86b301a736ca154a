"""``hcformer aggregate``: run folders -> medians over seeds, one cell of a paper table at a time.

The paper "train[s] models three times and report[s] medians" (Sec. 4.2); so do we. The
run folder is the contract (docs/interfaces.md): this module reads ``metrics.json``,
``run.json``/``job.json`` (git commit, state) of ``<results>/runs/<exp_id>/seed<k>/``, the
profile JSON of ``hcformer profile`` (params, GFLOPs, latency per row) and, for provenance, the
MLflow run of each folder (matched by its ``run_dir`` tag). It never runs a model.

Outputs:

- a table's cells (``--table T --out F.csv``), long form: one line per (row, column) with the
  paper's value, ours (the median over seeds), min, max, n of n_expected seeds, the difference,
  a status (``ok``, ``partial``, ``running``, ``failed``, ``missing``, ``no_metric``,
  ``quoted``, ``setting``, ``not_built``) and the runs it came from (JSON: experiment, seed,
  status, value, MLflow run id, git commit);
- ``runs.csv`` (every expected run, done or not) and ``summary.csv`` (median, min, max, n per
  experiment and metric) with ``--runs-csv`` / ``--summary-csv``;
- with ``--snapshot DIR``, all of it and every table, figure and README at once from whatever
  has finished (:mod:`hcformer.analysis.snapshot`).

A run is done, running, failed or missing as ``hcformer status`` says
(:func:`hcformer.runfolder.run_state`, one scheduler query for all pending SLURM jobs; a run
not started is ``missing`` here). Missing runs are marked, never dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError
from hcformer.experiments import Table, scales
from hcformer.runfolder import (
    JOB,
    METRICS,
    RUN_INFO,
    RunState,
    pending_slurm_jobs,
    read_json,
    run_dir,
    run_state,
    slurm_states,
)

CELL_FIELDS = (
    "table",
    "row",
    "row_index",
    "column",
    "kind",
    "paper",
    "ours",
    "min",
    "max",
    "n",
    "n_expected",
    "diff",
    "status",
    "quoted",
    "source",
    "runs",
)


# --------------------------------------------------------------------------------------
# Run folders.


@dataclass
class RunRecord:
    """What one run folder holds (or that it is missing)."""

    experiment: str
    seed: int
    run_dir: Path
    status: str  # done | failed | running | missing
    metrics: dict[str, float] = field(default_factory=dict)
    git_commit: str = ""
    mlflow_run_id: str = ""
    job_id: str = ""
    reason: str = ""  # why failed / what runs it (hcformer status's words)
    log: str = ""  # a failed run's log

    def provenance(self, metric: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "experiment": self.experiment,
            "seed": self.seed,
            "status": self.status,
            "run_dir": str(self.run_dir),
            "mlflow_run_id": self.mlflow_run_id or None,
            "git_commit": self.git_commit or None,
        }
        if metric is not None:
            out["value"] = self.metrics.get(metric)
        if self.status in ("failed", "running"):
            out["reason"] = self.reason
        if self.status == "failed" and self.log:
            out["log"] = self.log
        return out


def _read_json(path: Path) -> dict[str, Any]:
    """A finished file's JSON mapping (``{}`` when absent; invalid JSON is an error)."""
    return read_json(path, strict=True) or {}


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def read_run(
    results: Path,
    experiment: str,
    seed: int,
    slurm: dict[str, str] | None = None,
    slurm_asked: bool = False,
) -> RunRecord:
    """The record of ``<results>/runs/<experiment>/seed<seed>``: ``done`` (``metrics.json``),
    ``running`` (a live job owns the folder), ``failed`` (no live job: ``job.json`` says failed,
    an error marker, or a job gone without ``metrics.json``) or ``missing`` (no folder), as
    ``hcformer status`` decides; ``slurm``: the states of the recorded SLURM jobs
    (:func:`hcformer.runfolder.slurm_states`)."""
    folder = run_dir(results, experiment, seed)
    state = run_state(Path(results), experiment, seed, slurm or {}, slurm_asked)
    status = RunState(state.state).table_word
    job = _read_json(folder / JOB) if status != "missing" else {}
    info = _read_json(folder / RUN_INFO) if status != "missing" else {}
    metrics = _numbers(_read_json(folder / METRICS)) if status == "done" else {}
    commit = str(info.get("git_commit") or job.get("git_commit") or "")
    return RunRecord(
        experiment=experiment,
        seed=seed,
        run_dir=folder,
        status=status,
        metrics=metrics,
        git_commit=commit,
        mlflow_run_id=str(info.get("mlflow_run_id") or ""),
        job_id=str(job.get("job_id") or ""),
        reason=state.reason,
        log=state.log,
    )


def mlflow_run_ids(uri: str, scale: str, datasets: set[str]) -> dict[str, str]:
    """``resolved run_dir -> MLflow run id`` for the runs of ``scale`` in the store at ``uri``
    (``{}`` when the store cannot be read: provenance then says so)."""
    if not uri:
        return {}
    from hcformer.tracking.store import local_path

    path = local_path(uri)
    if path is not None and not path.exists():
        return {}  # no store yet (nothing synced): opening it would create it
    try:
        from hcformer.tracking.store import client
        from hcformer.tracking.tracker import experiment_name

        mlflow = client(uri)
        out: dict[str, str] = {}
        for dataset in sorted(datasets):
            exp = mlflow.get_experiment_by_name(experiment_name(scale, dataset))
            if exp is None:
                continue
            token = None
            while True:
                page = mlflow.search_runs([exp.experiment_id], max_results=1000, page_token=token)
                for run in page:
                    path = run.data.tags.get("run_dir")
                    if path:
                        out[path] = run.info.run_id
                token = page.token
                if not token:
                    break
        return out
    except Exception as exc:  # an unreachable store must not lose the tables
        print(f"hcformer aggregate: warning: MLflow store {uri} not read ({exc})", file=sys.stderr)
        return {}


def collect_runs(
    results: Path,
    experiments: list[str],
    seeds: list[int],
    mlflow_ids: dict[str, str] | None = None,
) -> dict[tuple[str, int], RunRecord]:
    """Every expected (experiment, seed) run, found or not (the scheduler is asked once, for
    the pending SLURM jobs only)."""
    slurm, asked = slurm_states(pending_slurm_jobs(results, experiments, seeds))
    out = {}
    for experiment in experiments:
        for seed in seeds:
            record = read_run(results, experiment, seed, slurm, asked)
            if not record.mlflow_run_id and mlflow_ids:
                record.mlflow_run_id = mlflow_ids.get(str(record.run_dir.resolve()), "")
            out[(experiment, seed)] = record
    return out


# --------------------------------------------------------------------------------------
# Medians over seeds.


def median_stats(values: list[float]) -> dict[str, float | int | None]:
    """Median, min, max and n of the values (``None`` when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def summarise(runs: dict[tuple[str, int], RunRecord]) -> list[dict[str, Any]]:
    """One line per (experiment, metric): median, min, max, n of the seeds that finished."""
    by_exp: dict[str, list[RunRecord]] = {}
    for record in runs.values():
        by_exp.setdefault(record.experiment, []).append(record)
    lines = []
    for experiment, records in sorted(by_exp.items()):
        metrics = sorted({m for r in records for m in r.metrics})
        if not metrics:
            lines.append(
                {
                    "experiment": experiment,
                    "metric": None,
                    "n_expected": len(records),
                    **median_stats([]),
                }
            )
        for metric in metrics:
            values = [r.metrics[metric] for r in records if metric in r.metrics]
            lines.append(
                {
                    "experiment": experiment,
                    "metric": metric,
                    "n_expected": len(records),
                    **median_stats(values),
                }
            )
    return lines


# --------------------------------------------------------------------------------------
# A table's cells.


def load_profile(path: Path | None) -> dict[str, dict[str, Any]]:
    """``row label -> {params_m, gflops, latency_ms, ...}`` from ``hcformer profile``'s JSON."""
    if path is None or not Path(path).exists():
        return {}
    data = _read_json(Path(path))
    rows = data.get("rows", [])
    if isinstance(rows, dict):
        return {str(k): v for k, v in rows.items() if isinstance(v, dict)}
    out = {}
    for row in rows:
        if isinstance(row, dict) and "label" in row:
            out[str(row["label"])] = row
    return out


def _profile_value(entry: dict[str, Any], column: str) -> float | None:
    value = entry.get(column)
    if isinstance(value, dict):  # {"ours": .., "paper": ..} style
        value = value.get("ours", value.get("value"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _diff(ours: Any, paper: Any) -> float | None:
    if (
        isinstance(ours, (int, float))
        and isinstance(paper, (int, float))
        and not isinstance(paper, bool)
    ):
        return float(ours) - float(paper)
    return None


def table_cells(
    table: Table,
    runs: dict[tuple[str, int], RunRecord],
    seeds: list[int],
    profile: dict[str, dict[str, Any]],
    skipped: set[str] | None = None,
    profile_source: str = "",
) -> list[dict[str, Any]]:
    """The cells of a paper table (``hcformer.experiments.Table``): paper, ours, diff, runs."""
    skipped = skipped or set()
    cells = []
    for index, row in enumerate(table.rows):
        for column in table.columns:
            paper = row.values.get(column)
            cell: dict[str, Any] = {
                "table": table.id,
                "row": row.label,
                "row_index": index,
                "column": column,
                "paper": paper,
                "ours": None,
                "min": None,
                "max": None,
                "n": 0,
                "n_expected": 0,
                "diff": None,
                "quoted": bool(row.quoted),
                "source": row.source,
                "runs": [],
            }
            kind = table.kinds[column]  # experiments/columns.yaml
            if kind == "setting":
                cell.update(kind="setting", status="setting")
            elif not row.runs:
                cell.update(kind="metric", status="quoted")
            elif kind == "profile":
                cell["kind"] = "profile"
                value = _profile_value(profile.get(row.label, {}), column)
                if value is None:
                    cell["status"] = "not_built" if row.requires else "missing"
                else:
                    cell.update(ours=value, n=1, n_expected=1, status="ok")
                    cell["runs"] = [{"profile": profile_source, "row": row.label}]
            else:
                cell["kind"] = "metric"
                chosen = [r for r in row.runs if r.column == column] or [
                    r for r in row.runs if r.column is None
                ]
                if not chosen:
                    cell["status"] = "missing"
                else:
                    run = chosen[0]
                    metric = run.metric or column
                    records = [runs.get((run.experiment_id, s)) for s in seeds]
                    values = [
                        r.metrics[metric] for r in records if r is not None and metric in r.metrics
                    ]
                    stats = median_stats(values)
                    cell.update(
                        ours=stats["median"],
                        min=stats["min"],
                        max=stats["max"],
                        n=stats["n"],
                        n_expected=len(seeds),
                    )
                    cell["runs"] = [r.provenance(metric) for r in records if r is not None]
                    if run.experiment_id in skipped:
                        cell["status"] = "not_built"
                    elif stats["n"] == len(seeds):
                        cell["status"] = "ok"
                    elif stats["n"]:
                        cell["status"] = "partial"
                    elif any(r is not None and r.status == "done" for r in records):
                        cell["status"] = "no_metric"  # the runs finished but do not report it
                    elif any(r is not None and r.status == "failed" for r in records):
                        cell["status"] = "failed"
                    elif any(r is not None and r.status == "running" for r in records):
                        cell["status"] = "running"
                    else:
                        cell["status"] = "missing"
            cell["diff"] = _diff(cell["ours"], paper) if cell["kind"] != "setting" else None
            cells.append(cell)
    return cells


def write_cells(cells: list[dict[str, Any]], path: Path) -> None:
    """The cells as CSV (``runs`` as JSON text), written to a temporary name and renamed."""
    import pandas as pd

    frame = pd.DataFrame(
        [{**c, "runs": json.dumps(c["runs"]), "paper": _cell_text(c["paper"])} for c in cells],
        columns=list(CELL_FIELDS),
    )
    _write_csv(frame, Path(path))


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The cells written by :func:`write_cells`, with numbers and runs parsed back."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise HCFormerError(
            f"{path}: no such aggregate file (run hcformer aggregate --table first)"
        )
    frame = pd.read_csv(
        path, dtype={"paper": str, "row": str, "source": str}, keep_default_na=False
    )
    missing = set(CELL_FIELDS) - set(frame.columns)
    if missing:
        raise HCFormerError(f"{path}: not an aggregate file (missing columns {sorted(missing)})")
    cells = []
    for raw in frame.to_dict("records"):
        cell = dict(raw)
        for key in ("ours", "min", "max", "diff"):
            cell[key] = None if cell[key] in ("", None) else float(cell[key])
        for key in ("n", "n_expected", "row_index"):
            cell[key] = int(cell[key]) if cell[key] not in ("", None) else 0
        cell["paper"] = _parse_paper(cell["paper"])
        cell["quoted"] = str(cell["quoted"]) in ("True", "true", "1")
        cell["runs"] = json.loads(cell["runs"]) if cell["runs"] else []
        cells.append(cell)
    return cells


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_paper(text: str) -> Any:
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text else number


def run_lines(
    runs: dict[tuple[str, int], RunRecord], experiments: dict[str, Any], skipped: set[str]
) -> list[dict[str, Any]]:
    """The lines of ``runs.csv``: every expected run, its status, where it is and its metrics."""
    lines = []
    for record in runs.values():
        exp = experiments[record.experiment]
        lines.append(
            {
                "experiment": record.experiment,
                "dataset": exp.dataset,
                "seed": record.seed,
                "status": "not_built" if record.experiment in skipped else record.status,
                "tables": "; ".join(f"{t}: {label}" for t, label in exp.rows),
                "run_dir": str(record.run_dir),
                "job_id": record.job_id,
                "mlflow_run_id": record.mlflow_run_id,
                "git_commit": record.git_commit,
                **record.metrics,
            }
        )
    return lines


def write_runs(
    runs: dict[tuple[str, int], RunRecord],
    experiments: dict[str, Any],
    skipped: set[str],
    runs_csv: Path | None,
    summary_csv: Path | None,
) -> None:
    """``runs.csv`` (every expected run) and ``summary.csv`` (medians per experiment, metric)."""
    import pandas as pd

    if runs_csv is not None:
        _write_csv(pd.DataFrame(run_lines(runs, experiments, skipped)), Path(runs_csv))
    if summary_csv is not None:
        _write_csv(pd.DataFrame(summarise(runs)), Path(summary_csv))


def _write_csv(frame: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# `hcformer aggregate`


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcformer aggregate",
        description="Medians over seeds of the run folders: a table's cells, or runs.csv.",
    )
    p.add_argument("--results", required=True, help="a scale's results root, e.g. results/smoke")
    p.add_argument("--scale", required=True, choices=scales())
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table", help="a paper table id (hcformer experiments lists them)")
    p.add_argument("--profile", help="the table's `hcformer profile` JSON")
    p.add_argument("--out", help="the table's cells CSV (default RESULTS/aggregate/TABLE.csv)")
    p.add_argument("--runs-csv", help="write every run of every table here")
    p.add_argument("--summary-csv", help="write medians per experiment and metric here")
    p.add_argument("--skip-requires", nargs="*", default=[], help="parts left out (not_built)")
    p.add_argument("--mlflow-uri", default="", help="read MLflow run ids from this store")
    p.add_argument(
        "--snapshot",
        nargs="?",
        const="",
        metavar="DIR",
        help="every table, figure and the README from the runs finished so far, waiting for "
        "none (default DIR: RESULTS/snapshot)",
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from hcformer.experiments import all_experiments, load_table

    results = Path(args.results)
    experiments = all_experiments(args.scale)
    skipped = {
        e.id for e in experiments.values() if e.requires and e.requires in args.skip_requires
    }
    if args.snapshot is not None:
        from hcformer.analysis.snapshot import build

        snap = build(
            results,
            args.scale,
            args.seeds,
            Path(args.snapshot) if args.snapshot else None,
            args.skip_requires,
            args.mlflow_uri,
        )
        print(snap.summary())
        for error in snap.errors:
            print(f"hcformer aggregate: error: snapshot: {error}", file=sys.stderr)
        return 1 if snap.errors else 0
    if not args.table and not (args.runs_csv or args.summary_csv):
        raise HCFormerError(
            "give --table (a table's cells), --runs-csv/--summary-csv or --snapshot"
        )
    datasets = {e.dataset for e in experiments.values()}
    ids = mlflow_run_ids(args.mlflow_uri, args.scale, datasets)
    if args.table:
        table = load_table(args.table)
        needed = list(dict.fromkeys(i for row in table.rows for i in row.experiment_ids))
        runs = collect_runs(results, needed, args.seeds, ids)
        profile_path = Path(args.profile) if args.profile else None
        cells = table_cells(
            table, runs, args.seeds, load_profile(profile_path), skipped, str(profile_path or "")
        )
        out = Path(args.out) if args.out else results / "aggregate" / f"{args.table}.csv"
        write_cells(cells, out)
        counts: dict[str, int] = {}
        for cell in cells:
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(f"hcformer aggregate: {args.table}: {len(cells)} cells ({summary}) -> {out}")
    if args.runs_csv or args.summary_csv:
        runs = collect_runs(results, sorted(experiments), args.seeds, ids)
        write_runs(runs, experiments, skipped, args.runs_csv, args.summary_csv)
        if args.runs_csv:
            done = sum(r.status == "done" for r in runs.values())
            print(f"hcformer aggregate: {done} of {len(runs)} runs done -> {args.runs_csv}")
    return 0
