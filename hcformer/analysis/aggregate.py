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

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hcformer.errors import HCFormerError
from hcformer.experiments import Table
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
from hcformer.tracking.store import client, local_path
from hcformer.tracking.tracker import experiment_name

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
    path = local_path(uri)
    if path is not None and not path.exists():
        return {}  # no store yet (nothing synced): opening it would create it
    try:
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
    frame = pd.DataFrame(
        [{**c, "runs": json.dumps(c["runs"]), "paper": _cell_text(c["paper"])} for c in cells],
        columns=list(CELL_FIELDS),
    )
    _write_csv(frame, Path(path))


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The cells written by :func:`write_cells`, with numbers and runs parsed back."""
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
    if runs_csv is not None:
        _write_csv(pd.DataFrame(run_lines(runs, experiments, skipped)), Path(runs_csv))
    if summary_csv is not None:
        _write_csv(pd.DataFrame(summarise(runs)), Path(summary_csv))


def _write_csv(frame: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
