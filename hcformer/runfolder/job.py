"""The launcher's side of a run folder: ``job.json``, the run-folder lock, the metrics' second
name.

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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError
from hcformer.runfolder.files import read_json, write_json_atomic
from hcformer.runfolder.paths import JOB, JOB_LOCK, LOCK, METRICS, METRICS_KEEP
from hcformer.runfolder.state import pid_alive

STALE_AFTER_S = 600.0  # a lock held from another host is stale when not refreshed for this long
REFRESH_EVERY_S = 60.0


class RunLockedError(HCFormerError):
    """Another live process is running this run folder."""


def read_job(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``job.json`` (None when absent or half-written)."""
    return read_json(Path(run_dir) / JOB)


@contextlib.contextmanager
def _job_lock(run_dir: Path) -> Iterator[None]:
    """Serialise the read-modify-write of ``job.json`` between the processes and threads of
    this host (the waiting process, the job, its heartbeat); best effort where flock fails."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / JOB_LOCK, "a") as fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def update_job(
    run_dir: str | Path, *, state_from: tuple[str, ...] | None = None, **fields: Any
) -> dict[str, Any]:
    """Merge ``fields`` into ``job.json`` (created when absent) and return the result.

    ``state_from``: set ``state`` only when the recorded one is among these (or absent), so
    that the waiting process never overwrites what the job itself has recorded since."""
    path = Path(run_dir) / JOB
    with _job_lock(Path(run_dir)):
        data = read_json(path) or {}
        if state_from is not None and data.get("state") not in (*state_from, None):
            fields.pop("state", None)
        data.update(fields)
        write_json_atomic(path, data)
    return data


def append_job(
    run_dir: str | Path, key: str, item: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """Append ``item`` to the list ``key`` of ``job.json`` (e.g. one submission attempt) and
    merge ``fields``; returns the result."""
    path = Path(run_dir) / JOB
    with _job_lock(Path(run_dir)):
        data = read_json(path) or {}
        data[key] = [*data.get(key, []), item]
        data.update(fields)
        write_json_atomic(path, data)
    return data


def keep_metrics(run_dir: str | Path) -> None:
    """Give a finished run's ``metrics.json`` its second name ``.metrics.json.keep``."""
    run_dir = Path(run_dir)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / METRICS_KEEP).unlink()
    with contextlib.suppress(OSError):  # a file system without hard links: no safety net
        os.link(run_dir / METRICS, run_dir / METRICS_KEEP)


def restore_metrics(run_dir: str | Path) -> bool:
    """Put a finished run's ``metrics.json`` back from ``.metrics.json.keep`` when it was
    deleted; True when it did."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).exists() or not (run_dir / METRICS_KEEP).exists():
        return False
    try:
        os.link(run_dir / METRICS_KEEP, run_dir / METRICS)
    except OSError:  # FileExistsError included: another process put it back first
        return False
    return True


class RunLock:
    """The lock of one run folder, held by the process that submits and waits.

    Use as a context manager. ``refresh()`` (called while waiting) keeps a lock held from another
    host from looking stale; ``note(job_id=...)`` records the job the holder waits on.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None
        self._content: dict[str, Any] = {}
        self._last_refresh = 0.0

    def _is_stale(self, held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname():
            return not pid_alive(held.get("pid", -1))
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
