"""MLflow mirror of the run folders (docs/pipeline.md, "MLflow"): one MLflow run per run folder.

``ensure_store(uri)`` creates a store once before parallel runs; ``check_live(run_dir, config,
info)`` refuses live logging to a SQLite or file store on a network file system;
``open_tracker(run_dir, config, info)`` attaches a run folder to its MLflow run; ``hcformer
sync-mlflow`` (``tracking.sync``) fills MLflow in from the run folders. ``mlflow`` is imported
only when a store is used.
"""

from hcformer.tracking.store import (
    check_live_store,
    default_uri,
    ensure_store,
    resolve_uri,
    results_root,
)
from hcformer.tracking.tracker import (
    RunTracker,
    check_live,
    experiment_name,
    method,
    open_tracker,
    run_name,
    run_tags,
    tracking_uri,
)

__all__ = [
    "RunTracker",
    "check_live",
    "check_live_store",
    "default_uri",
    "ensure_store",
    "experiment_name",
    "method",
    "open_tracker",
    "resolve_uri",
    "results_root",
    "run_name",
    "run_tags",
    "tracking_uri",
]
