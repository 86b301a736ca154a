"""Where MLflow runs go: the tracking URI and the one-time creation of a SQLite store.

Default store: ``sqlite:///<results>/<scale>/mlflow.db`` (DESIGN.md step 6), where
``<results>/<scale>`` is the scale's results root (the parent of the ``runs/`` folder that holds
the run folder); any URI through ``cfg.tracking.uri`` or ``MLFLOW_TRACKING_URI`` (a tracking
server on clusters). A brand-new SQLite store must be created once before parallel writers start
(notes/mlflow.md: 7 of 8 processes opening a new store at once failed): :func:`ensure_store`,
serialised by a file lock so that concurrent callers are safe too.

``mlflow`` is imported inside functions (2 s).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# Fail fast when a tracking server is unreachable: the run folder is the source of truth.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def results_root(run_dir: str | Path, scale: str) -> Path:
    """The scale's results root of a run folder: the parent of its ``runs/`` ancestor, else
    ``results/<scale>`` under the working directory."""
    run_dir = Path(run_dir).resolve()
    for parent in run_dir.parents:
        if parent.name == "runs":
            return parent.parent
    return Path.cwd().resolve() / "results" / scale


def default_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def resolve_uri(configured: str, root: str | Path) -> str:
    """``configured`` (cfg.tracking.uri), else ``$MLFLOW_TRACKING_URI``, else the default store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "") or default_uri(root)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_location(uri: str, experiment_name: str) -> str | None:
    """Artefacts of a SQLite store live beside it (``mlartifacts/``), never in the working
    directory; a server decides for itself (None)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = experiment_name.replace("/", "__")
    return (db.resolve().parent / "mlartifacts" / safe).as_uri()


def client(uri: str):
    """An ``MlflowClient`` for ``uri`` (importing mlflow on first use)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_store(uri: str) -> None:
    """Create (or migrate) the store at ``uri`` once; safe to call from many processes."""
    db = sqlite_path(uri)
    if db is None:
        client(uri).search_experiments(max_results=1)
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
