"""MLflow mirror of the run folders (DESIGN.md step 6): one MLflow run per run folder.

``ensure_store(uri)`` creates a store once before parallel runs; ``open_tracker(run_dir, config,
info)`` attaches a run folder to its MLflow run; ``hcformer sync-mlflow`` (``tracking.sync``)
fills MLflow in from the run folders. ``mlflow`` is imported only when a store is used.
"""

from hcformer.tracking.store import default_uri, ensure_store, resolve_uri, results_root
from hcformer.tracking.tracker import (
    RUN_INFO,
    RunTracker,
    experiment_name,
    open_tracker,
    run_name,
    run_tags,
)

__all__ = [
    "RUN_INFO",
    "RunTracker",
    "default_uri",
    "ensure_store",
    "experiment_name",
    "open_tracker",
    "resolve_uri",
    "results_root",
    "run_name",
    "run_tags",
]
