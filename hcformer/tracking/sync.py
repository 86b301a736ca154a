"""Fill MLflow in from the run folders (``hcformer sync-mlflow``,
:mod:`hcformer.commands.sync_mlflow`).

The run folders are the source of truth (docs/pipeline.md, "MLflow"). For every run folder
under a results tree (a folder with ``config.yaml``):

- with ``metrics.json`` and no MLflow run yet (matched by the ``run_dir`` tag): a FINISHED run
  with params, tags, the training log as per-step metrics, the final metrics and artefacts;
- with ``metrics.json`` and an MLflow run that is not FINISHED (live logging was cut off): the
  final metrics and artefacts are added and the run is marked FINISHED;
- without metrics but marked failed (``job.json`` state ``failed``, or an ``error.txt`` /
  ``FAILED`` file): a FAILED run;
- anything else (pending or running) is left alone.

Times are the run's own, not the sync's: the run starts at ``run.json``'s ``started_at`` (when
training first started; older folders: the first training-log line, else ``config.yaml``'s
modification time) and ends when ``metrics.json`` was written (a failed run: its last log or job
file); each training-log line is stamped with its ``timestamp``. The process that runs the sync
is the one writer of a SQLite store, so it may live on a network file system.

Idempotent: a second sync changes nothing. Without ``--uri`` each folder goes to its scale's
default store (``<results>/<scale>/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import contextlib
import json
import pwd
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from hcformer.errors import HCFormerError
from hcformer.runfolder import (
    CHECKPOINTS,
    CONFIG,
    ERROR_MARKERS,
    JOB,
    METRICS,
    TRAIN_LOG,
    read_job,
    read_json,
    run_info,
)
from hcformer.tracking import store
from hcformer.tracking.tracker import RunTracker

# Folders that hold copies of a run's files, not runs: checkpoints, and the artefact stores
# MLflow keeps beside its database (a copy of config.yaml is logged with every run).
_NOT_RUNS = {CHECKPOINTS, "mlartifacts", "mlruns"}


def run_folders(results: Path) -> Iterator[Path]:
    """Every run folder under ``results``: one that holds a ``config.yaml`` (sorted)."""
    for config in sorted(results.rglob(CONFIG)):
        if _NOT_RUNS.isdisjoint(config.relative_to(results).parts):
            yield config.parent


def failed(run_dir: Path) -> bool:
    job = read_job(run_dir) or {}
    return job.get("state") == "failed" or any((run_dir / m).exists() for m in ERROR_MARKERS)


# Keys of a training-log line that are not metrics: the line's wall-clock time (it stamps the
# metrics instead).
_NOT_METRICS = {"iteration", "timestamp"}


def train_log(run_dir: Path) -> Iterator[tuple[int, dict[str, float], float | None]]:
    """``(iteration, metrics, timestamp or None)`` of each line of ``train_log.jsonl``: the
    training losses and learning rate, and the periodic validation scores."""
    path = run_dir / TRAIN_LOG
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        stamp = entry.get("timestamp")
        values = {
            k: v
            for k, v in entry.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        yield int(entry.get("iteration", 0)), values, stamp if _is_number(stamp) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mtime(path: Path) -> float | None:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return None


def start_time(run_dir: Path, info: dict[str, Any]) -> float | None:
    """When the run first started training (Unix seconds), from its folder."""
    if _is_number(info.get("started_at")):
        return float(info["started_at"])
    for _, values, stamp in train_log(run_dir):
        if stamp is not None:  # the first line: its stamp less the training time before it
            return stamp - float(values.get("time", 0.0))
        break
    return _mtime(run_dir / CONFIG)


def end_time(run_dir: Path, finished: bool) -> float | None:
    """When the run ended: its evaluation wrote ``metrics.json`` (written last), or a failed
    run's latest log, job or error file."""
    if finished:
        return _mtime(run_dir / METRICS)
    names = (TRAIN_LOG, JOB, *ERROR_MARKERS)
    times = [t for t in (_mtime(run_dir / n) for n in names) if t is not None]
    return max(times, default=None)


def file_owner(path: Path) -> str:
    """The user name owning ``path`` ("" when unknown)."""
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError):
        return ""


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def sync_folder(run_dir: Path, uri: str) -> str:
    """Bring one folder's MLflow run up to date: ``created``, ``completed``, ``failed``,
    ``present`` (nothing to do) or ``skipped`` (not finished, not failed)."""
    config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    info = run_info(run_dir)
    metrics = read_json(run_dir / METRICS)
    is_failed = metrics is None and failed(run_dir)
    if metrics is None and not is_failed:
        return "skipped"
    info.setdefault("user", file_owner(run_dir / CONFIG))
    started = start_time(run_dir, info)
    if started is not None:
        info["started_at"] = started
    tracker = RunTracker(uri)
    dataset = str(config.get("data", {}).get("dataset", "unknown"))
    existing = tracker.find_run(run_dir, str(info["scale"]), dataset)
    if (
        existing is not None
        and existing.info.status in ("FINISHED", "FAILED")
        and (existing.info.status == "FINISHED" or is_failed)
    ):
        return "present"
    outcome = "completed" if existing is not None else "created"
    tracker.run_id = tracker._start(run_dir, config, info)
    if existing is None:
        for step, values, stamp in train_log(run_dir):
            tracker.log_metrics(values, step, stamp)
    ended = end_time(run_dir, not is_failed)
    if is_failed:
        tracker.end("FAILED", ended)
        return "failed"
    tracker.log_metrics(final_metrics(metrics), int(metrics.get("iterations", 0) or 0), ended)
    tracker.log_artifacts([run_dir / CONFIG, run_dir / METRICS])
    tracker.end("FINISHED", ended)
    if not tracker.enabled:
        raise HCFormerError(f"{run_dir}: could not write to the MLflow store {uri}")
    return outcome


def sync(results: Path, uri: str = "") -> dict[str, int]:
    """Sync every run folder under ``results``; counts per outcome."""
    counts: dict[str, int] = {}
    ensured: set[str] = set()
    for run_dir in run_folders(results):
        info = run_info(run_dir)
        target = uri or store.resolve_uri("", store.results_root(run_dir, str(info["scale"])))
        if target not in ensured:
            store.ensure_store(target)
            ensured.add(target)
        outcome = sync_folder(run_dir, target)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts
