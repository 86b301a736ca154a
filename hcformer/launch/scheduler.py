"""One scheduler query for every waiting run: a shared, file-cached ``squeue`` listing.

Each ``hcformer run`` blocks until its SLURM job ends, and about 200 of them wait at once at paper
scale. Instead of each asking ``squeue`` about its own job, they share one listing of all of the
user's jobs (``squeue -u $USER -t all``: pending, running and the recently ended with their end
state), cached in ``<results>/.scheduler/squeue.json``. Whoever finds the cache older than the
interval takes an exclusive ``flock`` on ``squeue.lock``, looks again (another process may just
have refreshed it) and only then asks SLURM; everyone else reads the file. So the scheduler sees
at most one query per interval however many runs wait (30 s at paper scale: 2 a minute).

A job submitted after the listing was taken is not judged ended by its absence (the state is
unknown until a listing newer than the submission). Only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from hcformer.runfolder import FINISHED_STATES, read_json, results_root, write_json_atomic

CACHE_DIR = ".scheduler"
CACHE_FILE = "squeue.json"
LOCK_FILE = "squeue.lock"
SQUEUE_TIMEOUT_S = 60

# NODE_FAIL and BOOT_FAIL are the node's fault, not the job's: ``hcformer run`` resubmits those
# (the new job resumes from the checkpoint).
NODE_FAILURES = ("NODE_FAIL", "BOOT_FAIL")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def query_squeue() -> dict[str, dict[str, str]] | None:
    """All of this user's jobs SLURM lists, ``{job_id: {"state", "name"}}``; None when squeue
    does not answer."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-u", _user(), "-t", "all", "-o", "%i|%T|%j"],
            capture_output=True,
            text=True,
            timeout=SQUEUE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    jobs: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[0]:
            jobs[parts[0]] = {"state": parts[1].split()[0] if parts[1] else "", "name": parts[2]}
    return jobs


class SlurmQueue:
    """The shared listing of this user's SLURM jobs under ``cache_dir``, at most ``interval_s``
    old (refreshed by whichever reader first finds it older)."""

    def __init__(self, cache_dir: Path, interval_s: float = 30.0) -> None:
        self.dir = Path(cache_dir)
        self.interval_s = float(interval_s)
        self._seen: dict[str, Any] | None = None

    @classmethod
    def for_run_dir(cls, run_dir: Path, interval_s: float = 30.0) -> SlurmQueue:
        """The queue shared by a results root: ``<results>/.scheduler`` for a run folder
        ``<results>/runs/<dataset>/<name>/seed<k>``, else the run folder's own."""
        root = results_root(run_dir) or Path(run_dir).resolve()
        return cls(root / CACHE_DIR, interval_s)

    def _fresh(self, data: dict[str, Any] | None, now: float) -> bool:
        return bool(data) and now - float(data.get("time", 0.0)) < self.interval_s

    def listing(self) -> dict[str, Any]:
        """``{"time": epoch seconds of the query, "ok": bool, "jobs": {...}}``."""
        now = time.time()
        if self._fresh(self._seen, now):
            return self._seen  # type: ignore[return-value]
        cache = self.dir / CACHE_FILE
        data = read_json(cache)
        if not self._fresh(data, now):
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / LOCK_FILE, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    data = read_json(cache)  # another process may have refreshed it meanwhile
                    if not self._fresh(data, time.time()):
                        asked = time.time()
                        jobs = query_squeue()
                        data = {"time": asked, "ok": jobs is not None, "jobs": jobs or {}}
                        write_json_atomic(cache, data)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        self._seen = data
        return data  # type: ignore[return-value]

    def wait_newer(self, since: float) -> dict[str, Any]:
        """A listing taken after ``since`` (waits for the next refresh when the cached one is
        older); its ``ok`` is False when squeue does not answer."""
        while True:
            data = self.listing()
            if float(data.get("time", 0.0)) > since or not data.get("ok"):
                return data
            time.sleep(min(self.interval_s, 1.0))

    def state(self, job_id: str, since: float = 0.0) -> str | None:
        """The SLURM state of ``job_id`` (``PENDING``, ``RUNNING``, ``NODE_FAIL``, ...), ``""``
        when SLURM no longer lists it (it ended), or None when unknown: squeue did not answer,
        or the listing predates ``since`` (the job's submission)."""
        data = self.listing()
        if not data.get("ok"):
            return None
        job = data.get("jobs", {}).get(str(job_id))
        if job is not None:
            return str(job.get("state", ""))
        if float(data.get("time", 0.0)) <= since:
            return None
        return ""

    def find(self, name: str, since: float = 0.0) -> tuple[str, str] | None:
        """``(job_id, state)`` of the newest listed job named ``name`` that still waits or runs,
        from a listing newer than ``since``; None when there is none."""
        data = self.listing()
        if not data.get("ok") or float(data.get("time", 0.0)) <= since:
            return None
        found = [
            (job_id, job.get("state", ""))
            for job_id, job in data.get("jobs", {}).items()
            if job.get("name") == name and job.get("state") not in FINISHED_STATES
        ]
        with contextlib.suppress(ValueError):
            found.sort(key=lambda item: int(item[0].split("_")[0]))
        return found[-1] if found else None
