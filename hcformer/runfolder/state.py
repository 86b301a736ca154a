"""The state of a run, and whether a live job owns its folder.

One vocabulary (:class:`RunState`) for ``hcformer status``, ``hcformer aggregate`` and the
snapshot; one answer to "is this process / this SLURM job still alive" for the launcher (which
re-attaches to a live job instead of submitting again) and for the status (which counts a run
as running or failed). A run is

- ``done``: ``metrics.json`` exists (the run folder's last file);
- ``running``: a live job owns the folder: the SLURM job recorded in ``job.json`` is still in
  the queue (``squeue``, asked once for all recorded ids), or the recorded local process, or the
  process holding the run-folder lock, is alive on this host, or (when neither can be asked)
  the job's heartbeat is recent;
- ``failed``: the folder exists and no live job owns it: ``job.json`` says ``failed``, an
  ``error.txt``/``FAILED`` marker exists, or the job ended without ``metrics.json`` (cancelled,
  killed, node lost; ``sacct`` names the SLURM state when accounting is on). A rerun resumes it;
- ``not_started``: no run folder (the tables and their provenance say ``missing``).

Only the standard library: ``hcformer status`` reads a whole smoke tree in well under 2 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError
from hcformer.runfolder.files import last_line, read_json
from hcformer.runfolder.paths import (
    ERROR_MARKERS,
    JOB,
    JOBS,
    LOCK,
    METRICS,
    TRAIN_LOG,
    run_dir,
    run_log,
)


class RunState(StrEnum):
    """The state of one expected run (one experiment, one seed); see the module docstring."""

    DONE = "done"
    RUNNING = "running"
    FAILED = "failed"
    NOT_STARTED = "not_started"

    @property
    def table_word(self) -> str:
        """The word of the tables, their provenance and ``runs.csv``: ``missing`` for a run
        not started, else the state itself."""
        return "missing" if self is RunState.NOT_STARTED else self.value


HEARTBEAT_FRESH_S = 900.0  # without a scheduler to ask, a job that beat this recently is alive
SLURM_TIMEOUT_S = 10.0  # hcformer status and aggregate: answer quickly
SQUEUE_TIMEOUT_S = 60.0  # the launcher: wait for a busy controller
# SLURM states after which a job neither runs nor waits (squeue's job state codes).
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
    }
)


# --------------------------------------------------------------------------------------
# Processes and SLURM jobs.


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (False for a pid that
    is not a positive whole number)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
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


def _ask(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run a SLURM client; None when it is not installed or does not answer in time."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _stdout(cmd: list[str]) -> str | None:
    out = _ask(cmd, SLURM_TIMEOUT_S)
    return out.stdout if out is not None and out.returncode == 0 else None


def slurm_job_state(job_id: str) -> str | None:
    """The SLURM state of ``job_id`` from ``squeue`` (``PENDING``, ``RUNNING``, ...), ``""`` when
    SLURM no longer lists it (it ended), or None when SLURM cannot be asked right now."""
    out = _ask(["squeue", "-h", "-j", str(job_id), "-o", "%T"], SQUEUE_TIMEOUT_S)
    if out is None:
        return None
    if out.returncode != 0:
        # squeue refuses ids it has forgotten ("Invalid job id specified"): the job has ended.
        return "" if "Invalid job id" in out.stderr else None
    states = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return states[0] if states else ""


def slurm_states(job_ids: list[str]) -> tuple[dict[str, str], bool]:
    """``({job id: state}, asked)`` for many jobs at once: one ``squeue`` for the queued and
    running ones, then ``sacct`` for the end state of the others (only with SLURM accounting).
    ``asked`` is False when squeue could not be asked."""
    ids = sorted({str(i) for i in job_ids if str(i).isdigit()})
    if not ids:
        return {}, False
    states: dict[str, str] = {}
    out = _stdout(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)])
    if out is None:
        # squeue refuses the whole list when one id is unknown to it: list all our jobs
        out = _stdout(["squeue", "-h", "-o", "%i %T", "--me"])
    if out is None:
        return {}, False
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ids:
            states[parts[0]] = parts[1]
    gone = [i for i in ids if i not in states]
    if gone:
        acct = _stdout(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(gone)])
        for line in (acct or "").splitlines():
            job, _, state = line.partition("|")
            if job in gone and state:
                states[job] = state.split()[0]
    return states, True


def job_alive(job: dict[str, Any] | None) -> bool:
    """Whether the job recorded in a ``job.json`` still runs (or waits in the queue); asks
    ``squeue`` about a SLURM job, and fails when it cannot."""
    if not job or job.get("state") in ("done", "failed"):
        return False
    launcher = job.get("launcher")
    if launcher == "slurm" and job.get("job_id"):
        state = slurm_job_state(str(job["job_id"]))
        if state is None:
            raise HCFormerError(
                f"cannot ask SLURM (squeue) whether job {job['job_id']} recorded in {JOB} "
                "still runs; try again when squeue answers"
            )
        return state != "" and state not in FINISHED_STATES
    if launcher == "local" and job.get("pid"):
        return job.get("host") == socket.gethostname() and pid_alive(job["pid"])
    return False


def pending_slurm_jobs(results: Path, experiments: list[str], seeds: list[int]) -> list[str]:
    """The SLURM job ids recorded in the folders of the runs that have no ``metrics.json``."""
    ids = []
    for experiment in experiments:
        for seed in seeds:
            folder = run_dir(results, experiment, seed)
            if (folder / METRICS).is_file() or not folder.is_dir():
                continue
            job = read_json(folder / JOB) or {}
            if job.get("launcher") == "slurm" and job.get("job_id"):
                ids.append(str(job["job_id"]))
    return ids


# --------------------------------------------------------------------------------------
# The state of one run.


@dataclass
class RunStatus:
    """The state of one expected run (one experiment, one seed)."""

    experiment: str
    seed: int
    run_dir: str
    state: RunState
    reason: str = ""  # why failed / what runs it
    job_id: str = ""
    log: str = ""  # the failed run's log file
    last_line: str = ""  # the last non-empty line of that log


def log_candidates(
    results: Path, folder: Path, experiment: str, seed: int, job: dict[str, Any]
) -> list[Path]:
    """Where a run's log may be, most specific first: submitit's log of the recorded job, the
    workflow's log of the run rule, the error markers."""
    out = []
    if job.get("job_id"):
        jobs = Path(job["folder"]) if job.get("folder") else folder / JOBS
        out += [jobs / f"{job['job_id']}_0_log.err", jobs / f"{job['job_id']}_0_log.out"]
    out += [run_log(results, experiment, seed), run_log(results, experiment)]
    out += [folder / marker for marker in ERROR_MARKERS]
    return out


def find_log(candidates: list[Path]) -> tuple[str, str]:
    """``(path, last line)`` of the first candidate with text in it (``("", "")`` if none)."""
    for path in candidates:
        line = last_line(path)
        if line:
            return str(path), line
    return "", ""


def run_state(
    results: Path,
    experiment: str,
    seed: int,
    slurm: dict[str, str],
    slurm_asked: bool,
    now: float | None = None,
) -> RunStatus:
    """Classify ``<results>/runs/<experiment>/seed<seed>`` (see the module docstring);
    ``slurm``: the states of the recorded SLURM jobs (:func:`slurm_states`)."""
    now = time.time() if now is None else now
    folder = run_dir(results, experiment, seed)
    status = RunStatus(experiment, seed, str(folder), RunState.NOT_STARTED)
    if (folder / METRICS).is_file():
        status.state = RunState.DONE
        return status
    if not folder.is_dir():
        return status
    job = read_json(folder / JOB) or {}
    status.job_id = str(job.get("job_id") or "")
    recorded = str(job.get("state") or "")
    marker = next((m for m in ERROR_MARKERS if (folder / m).exists()), "")
    alive, how = _alive(folder, job, slurm, slurm_asked, now)
    if alive and recorded != "failed" and not marker:
        status.state, status.reason = RunState.RUNNING, how
        return status
    status.state = RunState.FAILED
    if recorded == "failed":
        status.reason = f"{JOB}: state failed"
    elif marker:
        status.reason = f"{marker} present"
    else:
        status.reason = how or f"no live job owns the folder and it has no {METRICS}"
    status.log, status.last_line = find_log(log_candidates(results, folder, experiment, seed, job))
    return status


def _alive(
    folder: Path, job: dict[str, Any], slurm: dict[str, str], asked: bool, now: float
) -> tuple[bool, str]:
    """Whether a live job owns the folder, and a few words on how that was decided."""
    host = socket.gethostname()
    job_id = str(job.get("job_id") or "")
    if job.get("launcher") == "slurm" and job_id.isdigit() and asked:
        state = slurm.get(job_id, "")
        if state and state not in FINISHED_STATES:
            return True, f"SLURM job {job_id} {state}"
        ended = f"SLURM job {job_id} {state}" if state else f"SLURM job {job_id} no longer queued"
        return False, f"{ended} without {METRICS}"
    lock = read_json(folder / LOCK) or {}
    if lock.get("host") == host and pid_alive(lock.get("pid")):
        return True, f"pid {lock['pid']} holds the run-folder lock"
    if job.get("pid") and job.get("host") == host:
        if pid_alive(job["pid"]):
            return True, f"{job.get('launcher', 'local')} job pid {job['pid']}"
        return False, f"{job.get('launcher', 'local')} job pid {job['pid']} is gone"
    # Another host, or no scheduler to ask: judge by the most recent sign of life.
    beats = [float(job["heartbeat"])] if isinstance(job.get("heartbeat"), (int, float)) else []
    for name in (TRAIN_LOG, JOB, LOCK):
        with contextlib.suppress(OSError):
            beats.append((folder / name).stat().st_mtime)
    if beats and now - max(beats) < HEARTBEAT_FRESH_S:
        return True, f"heartbeat {now - max(beats):.0f} s ago"
    age = f"{(now - max(beats)) / 60:.0f} min ago" if beats else "never"
    return False, f"no live job (last sign of life {age})"
