"""The launcher's side of a run folder: ``job.json`` and the run-folder lock.

The whole run folder: docs/interfaces.md, "The run folder".

``results/<scale>/runs/<exp_id>/seed<k>/`` belongs to one run. Two files here are the launcher's:

- ``job.json``: the scheduler job that owns the run (``launcher``, ``job_id``, ``host``,
  ``pid`` of a local job, ``folder`` of submitit's files, ``attempt`` (SLURM_RESTART_COUNT + 1),
  ``heartbeat`` (epoch seconds, refreshed by the job while it runs), ``state`` (``submitting``,
  ``submitted``, ``running``, ``requeued``, ``done``, ``failed``) and ``git_commit``; under SLURM
  also ``job_name`` (unique per submission) and ``submit_started``, written before ``sbatch``
  runs, ``submissions`` (each attempt: ``at`` and ``job_id`` or ``error``) and
  ``node_failures``). A rerun reads it to re-attach to a live job instead of submitting again;
  ``.job.lock`` serialises its updates on one host.
- ``.metrics.json.keep``: a hard link to the finished run's ``metrics.json`` (see
  :func:`restore_metrics`).
- ``.lock``: held by the process that submits and waits (``hcformer run``); it names that
  process (``host``, ``pid``) and its job. A second ``hcformer run`` on the same folder fails
  with a clear error while the holder lives; a lock whose holder is gone (dead pid on this
  host, or no refresh for ``STALE_AFTER_S`` on another host) is stale and taken over.

Only the standard library: the waiting process imports no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError

JOB_FILE = "job.json"
LOCK_FILE = ".lock"
JOB_LOCK_FILE = ".job.lock"
METRICS_FILE = "metrics.json"
# A second name (hard link) of a finished run's metrics.json: when Snakemake deletes the file to
# run the rule again (an output it still marks incomplete after a crash), ``hcformer run`` puts
# the same file back (same content, same inode) instead of evaluating the run again.
METRICS_KEEP = ".metrics.json.keep"
STALE_AFTER_S = 600.0  # a lock held from another host is stale when not refreshed for this long
REFRESH_EVERY_S = 60.0


class RunLockedError(HCFormerError):
    """Another live process is running this run folder."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary name in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON mapping at ``path``, or None when it is absent or half-written."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_job(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / JOB_FILE)


@contextlib.contextmanager
def _job_lock(run_dir: Path) -> Iterator[None]:
    """Serialise the read-modify-write of ``job.json`` between the processes and threads of
    this host (the waiting process, the job, its heartbeat); best effort where flock fails."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / JOB_LOCK_FILE, "a") as fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def update_job(
    run_dir: Path, *, state_from: tuple[str, ...] | None = None, **fields: Any
) -> dict[str, Any]:
    """Merge ``fields`` into ``job.json`` (created when absent) and return the result.

    ``state_from``: set ``state`` only when the recorded one is among these (or absent), so
    that the waiting process never overwrites what the job itself has recorded since."""
    path = Path(run_dir) / JOB_FILE
    with _job_lock(run_dir):
        data = read_json(path) or {}
        if state_from is not None and data.get("state") not in (*state_from, None):
            fields.pop("state", None)
        data.update(fields)
        write_json_atomic(path, data)
    return data


def append_job(run_dir: Path, key: str, item: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Append ``item`` to the list ``key`` of ``job.json`` (e.g. one submission attempt) and
    merge ``fields``; returns the result."""
    path = Path(run_dir) / JOB_FILE
    with _job_lock(run_dir):
        data = read_json(path) or {}
        data[key] = [*data.get(key, []), item]
        data.update(fields)
        write_json_atomic(path, data)
    return data


def keep_metrics(run_dir: Path) -> None:
    """Give a finished run's ``metrics.json`` its second name ``METRICS_KEEP``."""
    run_dir = Path(run_dir)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / METRICS_KEEP).unlink()
    with contextlib.suppress(OSError):  # a file system without hard links: no safety net
        os.link(run_dir / METRICS_FILE, run_dir / METRICS_KEEP)


def restore_metrics(run_dir: Path) -> bool:
    """Put a finished run's ``metrics.json`` back from ``METRICS_KEEP`` when it was deleted;
    True when it did."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).exists() or not (run_dir / METRICS_KEEP).exists():
        return False
    try:
        os.link(run_dir / METRICS_KEEP, run_dir / METRICS_FILE)
    except FileExistsError:
        return False
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


# SLURM states after which a job neither runs nor waits.
FINISHED_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
)


def slurm_job_state(job_id: str) -> str | None:
    """The SLURM state of ``job_id`` from ``squeue`` (``PENDING``, ``RUNNING``, ...), ``""`` when
    SLURM no longer lists it (it ended), or None when SLURM cannot be asked right now."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses ids it has forgotten ("Invalid job id specified"): the job has ended.
        return "" if "Invalid job id" in out.stderr else None
    states = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return states[0] if states else ""


def job_alive(job: dict[str, Any] | None) -> bool:
    """Whether the job recorded in a ``job.json`` still runs (or waits in the queue)."""
    if not job or job.get("state") in ("done", "failed"):
        return False
    launcher = job.get("launcher")
    if launcher == "slurm" and job.get("job_id"):
        state = slurm_job_state(str(job["job_id"]))
        if state is None:
            raise HCFormerError(
                f"cannot ask SLURM (squeue) whether job {job['job_id']} recorded in job.json "
                "still runs; try again when squeue answers"
            )
        return state != "" and state not in FINISHED_STATES
    if launcher == "local" and job.get("pid"):
        return job.get("host") == socket.gethostname() and pid_alive(int(job["pid"]))
    return False


class RunLock:
    """The lock of one run folder, held by the process that submits and waits.

    Use as a context manager. ``refresh()`` (called while waiting) keeps a lock held from another
    host from looking stale; ``note(job_id=...)`` records the job the holder waits on.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None
        self._content: dict[str, Any] = {}
        self._last_refresh = 0.0

    def _is_stale(self, held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname():
            return not pid_alive(int(held.get("pid", -1)))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_AFTER_S

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._content = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": time.time(),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = read_json(self.path)
                if held is None:  # being written right now, or garbage: look again
                    time.sleep(0.2)
                    held = read_json(self.path) or {}
                if held and not self._is_stale(held):
                    job = f", job {held['job_id']}" if held.get("job_id") else ""
                    raise RunLockedError(
                        f"{self.run_dir}: run folder is locked by pid {held.get('pid')} on "
                        f"{held.get('host')}{job} ({self.path}); wait for it, or delete the lock "
                        "file if that process is gone"
                    ) from None
                # Stale: remove it only if it is still the one we judged (a racing process
                # may have replaced it), then try to create ours again.
                if (read_json(self.path) or {}) == held:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    self.took_over = held
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._content, fh)
            if (read_json(self.path) or {}).get("token") == self.token:
                self._last_refresh = time.time()
                return self
        raise RunLockedError(f"{self.run_dir}: could not take the run-folder lock {self.path}")

    def note(self, **fields: Any) -> None:
        """Record more about the holder (e.g. the job id it waits on) in the lock file."""
        self._content.update(fields)
        write_json_atomic(self.path, self._content)

    def refresh(self) -> None:
        if time.time() - self._last_refresh >= REFRESH_EVERY_S:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)
            self._last_refresh = time.time()

    def release(self) -> None:
        if (read_json(self.path) or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(run_dirs: list[Path]) -> Iterator[list[RunLock]]:
    """Lock several run folders (all or none)."""
    locks: list[RunLock] = []
    try:
        for run_dir in run_dirs:
            locks.append(RunLock(run_dir).acquire())
        yield locks
    finally:
        for lock in reversed(locks):
            lock.release()


def log_tail(paths: list[Path], lines: int = 40) -> str:
    """The last ``lines`` lines of the first existing, non-empty file of ``paths``."""
    for path in paths:
        with contextlib.suppress(OSError):
            text = Path(path).read_text(errors="replace")
            if text.strip():
                return "\n".join(text.rstrip().splitlines()[-lines:])
    return "(no log output)"


def git_commit(cwd: Path | None = None) -> str:
    """The checked-out commit of the project (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
