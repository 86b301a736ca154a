"""One MLflow run per run folder (docs/pipeline.md, "MLflow").

- experiment ``hcformer/<scale>/<dataset>``, tagged ``mlflow.experimentKind`` =
  ``custom_model_development`` (MLflow 3's UI then opens it on its training runs, not on the
  GenAI traces view);
- run name ``<model>/seed<k>``: the experiment id without its dataset (the experiment names it);
- start and end times: the run's own (``run.json``'s ``started_at``, the end of its evaluation),
  not when it was copied into MLflow;
- params: the flattened resolved config (nothing from the environment, no credentials);
- tags: ``exp_id``, ``seed``, ``scale``, ``method`` (``hcformer``, ``hcformer+``, ``maskformer``,
  ``pspnet``, ``hc-pspnet``, ...), ``git_commit``, ``run_dir`` (how a run folder finds its MLflow
  run again), ``table.<table_id>`` = row label for every paper-table row it feeds, and MLflow's
  system tags ``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type``,
  ``mlflow.source.git.commit`` and ``mlflow.note.content`` (the rows it feeds);
- metrics: the training losses and learning rate per logged iteration, the periodic validation
  scores (``solver.eval_every``) per iteration, the final metrics at the last iteration: so each
  score's history is its validation curve;
- artefacts: ``config.yaml`` and ``metrics.json``.

A store that cannot be reached never stops a run: the first failure prints one warning and the
tracker turns itself off (the run folder stays the source of truth; ``hcformer sync-mlflow``
fills MLflow in later).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from hcformer.config import flatten
from hcformer.families import HEADS
from hcformer.tracking import store

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SOURCE_NAME = "hcformer train"


def experiment_name(scale: str, dataset: str) -> str:
    return f"hcformer/{scale}/{dataset}"


def run_name(exp_id: str, seed: int) -> str:
    """``<model>/seed<k>``: the experiment id less its ``<dataset>/`` prefix."""
    return f"{exp_id.split('/', 1)[-1]}/seed{seed}"


def method(config: dict[str, Any]) -> str:
    """The method a config trains: the head type, ``+`` with a pixel encoder (HCFormer+),
    ``hc-`` for a per-pixel model whose backbone clusters (hierarchy level above 0)."""
    model = config.get("model") or {}
    head = model.get("head") or {}
    kind = str(head.get("type", "unknown"))
    if kind in HEADS and HEADS[kind].per_pixel:
        level = int((model.get("backbone") or {}).get("hierarchy_level", 0) or 0)
        return f"hc-{kind}" if level > 0 else kind
    return f"{kind}+" if int(head.get("encoder_layers", 0) or 0) > 0 else kind


def run_tags(
    info: dict[str, Any], run_dir: Path, config: dict[str, Any] | None = None
) -> dict[str, str]:
    """The tags of a run from its ``run.json`` (docs/interfaces.md, "The run folder") and
    config."""
    commit = str(info.get("git_commit", "unknown"))
    tags = {
        "exp_id": str(info.get("exp_id", "")),
        "seed": str(info.get("seed", "")),
        "scale": str(info.get("scale", "")),
        "git_commit": commit,
        "run_dir": str(Path(run_dir).resolve()),
        "mlflow.source.name": SOURCE_NAME,
        "mlflow.source.type": "JOB",
    }
    if config is not None:
        tags["method"] = method(config)
    if info.get("user"):
        tags["mlflow.user"] = str(info["user"])
    if info.get("host"):
        tags["host"] = str(info["host"])
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    rows = []
    for table_id, label in (info.get("tables") or {}).items():
        tags[f"table.{table_id}"] = str(label)
        rows.append(f"{table_id}: {label}")
    if rows:
        tags["mlflow.note.content"] = "Paper rows: " + "; ".join(rows)
    return tags


def millis(seconds: float | None) -> int | None:
    """Unix seconds as MLflow's milliseconds (None stays None)."""
    return None if seconds is None else int(round(float(seconds) * 1000))


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


class RunTracker:
    """Mirror of one run folder in MLflow, tolerant of an unreachable store.

    Arguments:
      uri: the tracking URI (see :func:`hcformer.tracking.store.resolve_uri`).
      enabled: False makes every call a no-op.
    """

    def __init__(self, uri: str, *, enabled: bool = True) -> None:
        self.uri = uri
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None

    # -- failure handling ------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"hcformer: warning: MLflow store {self.uri} unavailable while {what} "
            f"({type(exc).__name__}: {first[:200]}); the run goes on, its folder keeps "
            "everything and `hcformer sync-mlflow` can fill MLflow in later",
            file=sys.stderr,
        )
        self.enabled = False

    @property
    def client(self):
        if self._client is None:
            self._client = store.client(self.uri)
        return self._client

    # -- runs -----------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        key, kind = EXPERIMENT_KIND
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(
                    name,
                    artifact_location=store.artifact_location(self.uri, name),
                    tags={key: kind},
                )
            except Exception:  # created by a concurrent process in the meantime
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.tags.get(key) != kind:  # made before the tag existed
            self.client.set_experiment_tag(exp.experiment_id, key, kind)
        return exp.experiment_id

    def find_run(self, run_dir: Path, scale: str, dataset: str):
        """The MLflow run whose ``run_dir`` tag names this folder, or None."""
        exp = self.client.get_experiment_by_name(experiment_name(scale, dataset))
        if exp is None:
            return None
        path = str(Path(run_dir).resolve()).replace("'", "\\'")
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.run_dir = '{path}'", max_results=1
        )
        return runs[0] if runs else None

    def start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> str | None:
        """Attach to this folder's MLflow run, creating it (params and tags) when absent."""
        if not self.enabled:
            return None
        try:
            self.run_id = self._start(Path(run_dir), config, info)
        except Exception as exc:
            self._fail("starting the run", exc)
        return self.run_id

    def _start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> str:
        from mlflow.entities import Param  # here: 1.0 s, only when MLflow logging is on

        scale, dataset = str(info["scale"]), str(config["data"]["dataset"])
        found = self.find_run(run_dir, scale, dataset)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        exp_id = self._experiment_id(experiment_name(scale, dataset))
        tags = run_tags(info, run_dir, config)
        run = self.client.create_run(
            exp_id,
            start_time=millis(info.get("started_at")),
            tags=tags,
            run_name=run_name(str(info["exp_id"]), int(info["seed"])),
        )
        params = [Param(k, _param_value(v)) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        """Log ``metrics`` at ``step``, stamped ``timestamp`` (Unix seconds; default now)."""
        if not self.enabled or self.run_id is None:
            return
        try:
            from mlflow.entities import Metric  # here: as Param in _start

            now = millis(time.time() if timestamp is None else timestamp)
            batch = [
                Metric(k, float(v), now, step)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        except Exception as exc:
            self._fail("logging metrics", exc)

    def log_artifacts(self, paths: list[Path]) -> None:
        if not self.enabled or self.run_id is None:
            return
        try:
            for path in paths:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
        except Exception as exc:
            self._fail("logging artefacts", exc)

    def end(self, status: str = "FINISHED", end_time: float | None = None) -> None:
        """Mark the run ended at ``end_time`` (Unix seconds; default now)."""
        if not self.enabled or self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status, end_time=millis(end_time))
        except Exception as exc:
            self._fail("ending the run", exc)


def tracking_uri(run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> str:
    """The store a run folder's live logging uses: ``tracking.uri``, else
    ``$MLFLOW_TRACKING_URI``, else its scale's ``mlflow.db``."""
    root = store.results_root(run_dir, str(info.get("scale", "")))
    return store.resolve_uri(str(config.get("tracking", {}).get("uri", "")), root)


def check_live(run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
    """Refuse, before a run starts, live logging to a SQLite or file store on a network file
    system (:func:`hcformer.tracking.store.check_live_store`); nothing when tracking is off."""
    if config.get("tracking", {}).get("enabled", True):
        store.check_live_store(tracking_uri(run_dir, config, info))


def open_tracker(run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> RunTracker:
    """A started tracker for a run folder, with the store the config or environment names
    (created first when it is the default SQLite store). Live logging: a SQLite or file store
    on a network file system is refused (:func:`hcformer.tracking.store.check_live_store`)."""
    uri = tracking_uri(run_dir, config, info)
    tracker = RunTracker(uri, enabled=bool(config.get("tracking", {}).get("enabled", True)))
    if tracker.enabled:
        store.check_live_store(uri)
        try:
            store.ensure_store(uri)
        except Exception as exc:
            tracker._fail("creating the store", exc)
    tracker.start(run_dir, config, info)
    return tracker
