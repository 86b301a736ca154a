"""Where MLflow runs go: the tracking URI, the one-time creation of a SQLite store, and the check
that keeps live logging off network file systems.

Default store: ``sqlite:///<results>/<scale>/mlflow.db`` (docs/pipeline.md, "MLflow"), where
``<results>/<scale>`` is the scale's results root (the parent of the ``runs/`` folder that holds
the run folder); any URI through ``cfg.tracking.uri`` or ``MLFLOW_TRACKING_URI`` (a tracking
server on clusters). A brand-new SQLite store must be created once before parallel writers start
(notes/mlflow.md: 7 of 8 processes opening a new store at once failed): :func:`ensure_store`,
serialised by a file lock so that concurrent callers are safe too.

Live logging (runs writing MLflow as they train) goes to a tracking server or to a store on a
local disk: :func:`check_live_store` refuses a SQLite database or a file store on a network file
system (NFS, Lustre, GPFS, CIFS, ...: SQLite's locks are unreliable there and many compute nodes
would write at once). On a cluster the runs write only their folders and the one serial
``hcformer sync-mlflow`` step fills MLflow from them.

``mlflow`` is imported inside functions (2 s).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from hcformer import runfolder
from hcformer.errors import ConfigError

# Fail fast when a tracking server is unreachable: the run folder is the source of truth.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def results_root(run_dir: str | Path, scale: str) -> Path:
    """The scale's results root of a run folder: the parent of its ``runs/`` ancestor, else
    ``results/<scale>`` under the working directory."""
    root = runfolder.results_root(run_dir)
    return root if root is not None else Path.cwd().resolve() / "results" / scale


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


def local_path(uri: str) -> Path | None:
    """The file a store writes to: a ``sqlite:///`` database, or a file store (``file:`` URI or
    a plain path); None for a server (``http(s)://``, ``databricks``, ...)."""
    db = sqlite_path(uri)
    if db is not None:
        return db
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("file:"):
        return Path(uri[len("file:") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return None
    return Path(uri)


# File systems shared over a network or a cluster interconnect (``/proc/mounts`` type names).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph",
        "glusterfs", "fuse.glusterfs", "beegfs", "fhgfs", "panfs", "afs", "ncpfs", "9p",
        "orangefs", "pvfs2", "wekafs", "quobyte", "fuse.quobyte", "gfs2", "ocfs2",
        "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "davfs", "fuse.juicefs", "fuse.rclone",
    }
)  # fmt: skip

MOUNTS = Path("/proc/mounts")


def _unescape(field: str) -> str:
    """``/proc/mounts`` writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str | Path, mounts: str | Path | None = None) -> tuple[str, str] | None:
    """``(mount point, file system type)`` of the mount that holds ``path`` (which need not
    exist yet): the longest mount point above it in the ``mounts`` table (default
    :data:`MOUNTS`); None when the table cannot be read."""
    try:
        table = Path(mounts or MOUNTS).read_text()
    except OSError:
        return None
    target = Path(os.path.realpath(Path(path).expanduser().absolute()))
    best: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = Path(_unescape(fields[1])), fields[2]
        if (target == point or point in target.parents) and (
            best is None or len(str(point)) >= len(best[0])
        ):
            best = (str(point), fstype)
    return best


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs")


def check_live_store(uri: str, mounts: str | Path | None = None) -> None:
    """Refuse live logging to a SQLite database or file store on a network file system
    (:class:`~hcformer.errors.ConfigError`, one line naming the store, the mount and the fixes)."""
    path = local_path(uri)
    if path is None:
        return
    mount = mount_of(path, mounts)
    if mount is None or not is_network_filesystem(mount[1]):
        return
    point, fstype = mount
    raise ConfigError(
        f"tracking.uri {uri}: {path} is on a network file system ({fstype} mounted at {point}); "
        "runs must not log live to a SQLite or file store there. Log to a tracking server "
        "(MLFLOW_TRACKING_URI=http://<host>:5000) or set tracking.enabled=false (workflow: "
        "mlflow_live: false) and let `hcformer sync-mlflow` fill MLflow from the run folders"
    )


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
    from mlflow.tracking import MlflowClient  # here: 1.0 s, and GPU nodes may lack mlflow

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
