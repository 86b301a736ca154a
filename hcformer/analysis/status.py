"""``hcformer status``: where a campaign stands, per paper table (docs/campaign.md).

    hcformer status [--results results] [--scale smoke] [--table ID] [--seeds 0 1 2] [--json]

For every paper table it counts the runs the table needs (experiment x seed) that are

- ``done``: ``metrics.json`` exists (the run folder's last file, docs/interfaces.md);
- ``running``: a live job owns the folder: the SLURM job recorded in ``job.json`` is still in
  the queue (``squeue``, asked once for all recorded ids), or the recorded local process, or the
  process holding the run-folder lock, is alive on this host, or (when neither can be asked)
  the job's heartbeat is recent;
- ``failed``: the folder exists and no live job owns it: ``job.json`` says ``failed``, an
  ``error.txt``/``FAILED`` marker exists, or the job ended without ``metrics.json`` (cancelled,
  killed, node lost; ``sacct`` names the SLURM state when accounting is on). A rerun resumes it;
- ``not started``: no run folder.

For each failed run it prints the last line of its log and the log's path (submitit's
``jobs/<id>_0_log.err``, else the Snakemake rule's log, else ``error.txt``).

It reads files only and imports no torch (nor mlflow, pandas): it answers in well under 2 s on a
whole smoke tree. The table -> experiment mapping comes from :mod:`hcformer.experiments`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError
from hcformer.experiments import scales
from hcformer.launch.runfolder import pid_alive

STATES = ("done", "running", "failed", "not_started")
ERROR_MARKERS = ("error.txt", "FAILED")
HEARTBEAT_FRESH_S = 900.0  # without a scheduler to ask, a job that beat this recently is alive
SLURM_TIMEOUT_S = 10.0
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


@dataclass
class RunStatus:
    """The state of one expected run (one experiment, one seed)."""

    experiment: str
    seed: int
    run_dir: str
    state: str  # one of STATES
    reason: str = ""  # why failed / what runs it
    job_id: str = ""
    log: str = ""  # the failed run's log file
    last_line: str = ""  # the last non-empty line of that log


@dataclass
class TableStatus:
    id: str
    title: str
    counts: dict[str, int] = field(default_factory=dict)
    runs: list[RunStatus] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.runs)

    @property
    def complete(self) -> bool:
        return all(r.state == "done" for r in self.runs)


# --------------------------------------------------------------------------------------
# Reading run folders.


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or half-written
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    try:
        return pid_alive(int(pid))
    except (TypeError, ValueError):
        return False


def last_line(path: Path, max_bytes: int = 65536) -> str:
    """The last non-empty line of a text file (reading at most its last ``max_bytes``)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - max_bytes, 0))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def log_candidates(
    results: Path, run_dir: Path, experiment: str, seed: int, job: dict
) -> list[Path]:
    """Where a run's log may be, most specific first."""
    out = []
    if job.get("job_id"):
        folder = Path(job["folder"]) if job.get("folder") else run_dir / "jobs"
        out += [folder / f"{job['job_id']}_0_log.err", folder / f"{job['job_id']}_0_log.out"]
    logs = results / "logs" / "run"
    out += [logs / experiment / f"seed{seed}.log", logs / f"{experiment}.log"]
    out += [run_dir / marker for marker in ERROR_MARKERS]
    return out


def find_log(candidates: list[Path]) -> tuple[str, str]:
    """``(path, last line)`` of the first candidate with text in it (``("", "")`` if none)."""
    for path in candidates:
        line = last_line(path)
        if line:
            return str(path), line
    return "", ""


# --------------------------------------------------------------------------------------
# Asking SLURM (once for all recorded job ids).


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> tuple[dict[str, str], bool]:
    """``({job id: state}, asked)``: squeue for queued/running jobs, then sacct for the others
    (only works with SLURM accounting). ``asked`` is False when squeue could not be asked."""
    ids = sorted({str(i) for i in job_ids if str(i).isdigit()})
    if not ids:
        return {}, False
    states: dict[str, str] = {}
    out = _run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)])
    if out is None:
        # squeue refuses the whole list when one id is unknown to it: list all our jobs
        out = _run(["squeue", "-h", "-o", "%i %T", "--me"])
    if out is None:
        return {}, False
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ids:
            states[parts[0]] = parts[1]
    gone = [i for i in ids if i not in states]
    if gone:
        acct = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(gone)])
        for line in (acct or "").splitlines():
            job, _, state = line.partition("|")
            if job in gone and state:
                states[job] = state.split()[0]
    return states, True


# --------------------------------------------------------------------------------------
# The state of one run.


def run_state(
    results: Path,
    experiment: str,
    seed: int,
    slurm: dict[str, str],
    slurm_asked: bool,
    now: float | None = None,
) -> RunStatus:
    """Classify ``<results>/runs/<experiment>/seed<seed>`` (see the module docstring)."""
    now = time.time() if now is None else now
    run_dir = results / "runs" / experiment / f"seed{seed}"
    status = RunStatus(experiment, seed, str(run_dir), "not_started")
    if (run_dir / "metrics.json").is_file():
        status.state = "done"
        return status
    if not run_dir.is_dir():
        return status
    job = _read_json(run_dir / "job.json")
    status.job_id = str(job.get("job_id") or "")
    recorded = str(job.get("state") or "")
    marker = next((m for m in ERROR_MARKERS if (run_dir / m).exists()), "")
    alive, how = _alive(run_dir, job, slurm, slurm_asked, now)
    if alive and recorded != "failed" and not marker:
        status.state, status.reason = "running", how
        return status
    status.state = "failed"
    if recorded == "failed":
        status.reason = "job.json: state failed"
    elif marker:
        status.reason = f"{marker} present"
    else:
        status.reason = how or "no live job owns the folder and it has no metrics.json"
    status.log, status.last_line = find_log(log_candidates(results, run_dir, experiment, seed, job))
    return status


def _alive(
    run_dir: Path, job: dict[str, Any], slurm: dict[str, str], asked: bool, now: float
) -> tuple[bool, str]:
    """Whether a live job owns the folder, and a few words on how that was decided."""
    host = socket.gethostname()
    job_id = str(job.get("job_id") or "")
    if job.get("launcher") == "slurm" and job_id.isdigit() and asked:
        state = slurm.get(job_id, "")
        if state and state not in SLURM_ENDED:
            return True, f"SLURM job {job_id} {state}"
        ended = f"SLURM job {job_id} {state}" if state else f"SLURM job {job_id} no longer queued"
        return False, f"{ended} without metrics.json"
    lock = _read_json(run_dir / ".lock")
    if lock.get("host") == host and _pid_alive(lock.get("pid")):
        return True, f"pid {lock['pid']} holds the run-folder lock"
    if job.get("pid") and job.get("host") == host:
        if _pid_alive(job["pid"]):
            return True, f"{job.get('launcher', 'local')} job pid {job['pid']}"
        return False, f"{job.get('launcher', 'local')} job pid {job['pid']} is gone"
    # Another host, or no scheduler to ask: judge by the most recent sign of life.
    beats = [float(job["heartbeat"])] if isinstance(job.get("heartbeat"), (int, float)) else []
    for name in ("train_log.jsonl", "job.json", ".lock"):
        with contextlib.suppress(OSError):
            beats.append((run_dir / name).stat().st_mtime)
    if beats and now - max(beats) < HEARTBEAT_FRESH_S:
        return True, f"heartbeat {now - max(beats):.0f} s ago"
    age = f"{(now - max(beats)) / 60:.0f} min ago" if beats else "never"
    return False, f"no live job (last sign of life {age})"


# --------------------------------------------------------------------------------------
# Per table.


def campaign_status(
    results: Path, scale: str, seeds: list[int], table_id: str | None = None
) -> list[TableStatus]:
    """The status of every paper table (or one), from the run folders under ``results``."""
    from hcformer.experiments import load_table, load_tables

    tables = [load_table(table_id)] if table_id else load_tables()
    needed = {
        t.id: list(dict.fromkeys(i for row in t.rows for i in row.experiment_ids)) for t in tables
    }
    experiments = sorted({e for ids in needed.values() for e in ids})
    job_ids = []
    for exp in experiments:
        for seed in seeds:
            run_dir = results / "runs" / exp / f"seed{seed}"
            job = _read_json(run_dir / "job.json")
            pending = not (run_dir / "metrics.json").is_file()
            if pending and job.get("launcher") == "slurm" and job.get("job_id"):
                job_ids.append(str(job["job_id"]))
    slurm, asked = slurm_states(job_ids)
    now = time.time()
    runs = {
        (exp, seed): run_state(results, exp, seed, slurm, asked, now)
        for exp in experiments
        for seed in seeds
    }
    out = []
    for table in tables:
        status = TableStatus(table.id, table.title)
        status.runs = [runs[(exp, seed)] for exp in needed[table.id] for seed in seeds]
        status.counts = {s: sum(r.state == s for r in status.runs) for s in STATES}
        out.append(status)
    return out


def to_json(tables: list[TableStatus], results: Path, scale: str, seeds: list[int]) -> dict:
    unique = {(r.experiment, r.seed): r for t in tables for r in t.runs}
    return {
        "results": str(results),
        "scale": scale,
        "seeds": seeds,
        "tables": [
            {
                "id": t.id,
                "title": t.title,
                **t.counts,
                "total": t.total,
                "complete": t.complete,
                "runs": [asdict(r) for r in t.runs],
            }
            for t in tables
        ],
        "totals": {
            **{s: sum(r.state == s for r in unique.values()) for s in STATES},
            "total": len(unique),
        },
        "failed": [asdict(r) for r in unique.values() if r.state == "failed"],
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"hcformer status: {report['results']} (scale {report['scale']}, seeds "
             f"{' '.join(map(str, report['seeds']))})", ""]  # fmt: skip
    width = max([len(t["id"]) for t in report["tables"]] + [5])
    head = f"{'table':<{width}}  {'done':>5}  {'running':>7}  {'failed':>6}  {'not started':>11}"
    lines.append(f"{head}  {'total':>5}")
    for t in report["tables"]:
        mark = "  complete" if t["complete"] else ""
        lines.append(
            f"{t['id']:<{width}}  {t['done']:>5}  {t['running']:>7}  {t['failed']:>6}  "
            f"{t['not_started']:>11}  {t['total']:>5}{mark}"
        )
    tot = report["totals"]
    lines.append(
        f"{'runs':<{width}}  {tot['done']:>5}  {tot['running']:>7}  {tot['failed']:>6}  "
        f"{tot['not_started']:>11}  {tot['total']:>5}  (unique experiment x seed)"
    )
    running = [r for t in report["tables"] for r in t["runs"] if r["state"] == "running"]
    if running:
        seen = set()
        lines += ["", "running:"]
        for r in running:
            if r["run_dir"] not in seen:
                seen.add(r["run_dir"])
                lines.append(f"  {r['experiment']}/seed{r['seed']}: {r['reason']}")
    if report["failed"]:
        lines += ["", "failed (rerun the same command to resume from last.pt):"]
        for r in report["failed"]:
            lines.append(f"  {r['experiment']}/seed{r['seed']}: {r['reason']}")
            lines.append(f"    log: {r['log'] or '(no log found)'}")
            if r["last_line"]:
                lines.append(f"    last line: {r['last_line']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hcformer status",
        description="Runs done, running, failed and not started, per paper table.",
    )
    parser.add_argument(
        "--results",
        default="results",
        help="the results folder (default results; runs under RESULTS/SCALE/runs), or a scale's "
        "root that holds runs/ itself",
    )
    parser.add_argument("--scale", default="smoke", choices=scales())
    parser.add_argument("--table", help="only this table (e.g. table5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not (results / "runs").is_dir():
        results = results / args.scale
    if results.exists() and not results.is_dir():
        raise HCFormerError(f"--results {args.results}: not a folder")
    tables = campaign_status(results, args.scale, list(args.seeds), args.table)
    report = to_json(tables, results, args.scale, list(args.seeds))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0
