"""Submitit executors for the ``slurm`` and ``local`` launchers, and waiting on their jobs.

A run rule calls ``hcformer run``, which submits one job per run through submitit and blocks
until it ends, so Snakemake never needs to know SLURM (docs/pipeline.md, "One run"). This module
holds the submitit side: the SLURM options (:class:`SlurmOptions`), building an executor, and a handle
(:class:`JobHandle`) that tells whether a job (submitted now, or recorded in ``job.json`` by an
earlier process) has ended, without importing torch.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, JobPaths, pickle_load

from hcformer.errors import ConfigError, HCFormerError
from hcformer.launch.scheduler import NODE_FAILURES, SlurmQueue
from hcformer.runfolder import FINISHED_STATES, job_alive, pid_alive, slurm_job_state

# sbatch refusals worth retrying after a pause: a per-user or per-account submit limit, a busy or
# unreachable controller. Anything else (a wrong partition or account) fails at once.
TRANSIENT_SUBMIT_ERRORS = re.compile(
    r"MaxSubmitJob|job submit limit|Socket timed out|Unable to contact slurm controller|"
    r"temporarily unable|Resource temporarily unavailable|Connection refused|"
    r"Transport endpoint is not connected|try again",
    re.IGNORECASE,
)
MAX_BACKOFF_S = 1800.0


@dataclass
class SlurmOptions:
    """What a SLURM job asks for. ``None`` = the experiment's ``Config.resources`` (``gpus``,
    ``cpus`` and ``mem_gb`` per node, ``time_min``), then defaults.

    ``tasks_per_node`` = ``gpus_per_node`` by default (one DDP process per GPU); the node's CPUs
    are shared among its tasks.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    signal_delay_s: int = 120  # the engine's save must fit in here
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load ...)
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch flag

    def resolved(self, resources: dict[str, Any]) -> dict[str, Any]:
        """The submitit SlurmExecutor parameters for an experiment's ``resources``."""
        res = dict(resources or {})

        def pick(value: Any, *keys: str, default: Any = None) -> Any:
            if value is not None:
                return value
            for key in keys:
                if res.get(key) is not None:
                    return res[key]
            return default

        gpus = int(pick(self.gpus_per_node, "gpus_per_node", "gpus", default=1))
        nodes = int(pick(self.nodes, "nodes", default=1))
        if gpus < 0 or nodes < 1:
            raise ConfigError(f"slurm: gpus_per_node={gpus}, nodes={nodes}: expected >= 0 and >= 1")
        if res.get("time_hours") is not None and self.time_min is None and "time_min" not in res:
            res["time_min"] = int(float(res["time_hours"]) * 60)
        tasks = int(pick(self.tasks_per_node, "tasks_per_node", default=max(gpus, 1)))
        # ``resources.cpus`` counts the CPUs of a node; SLURM wants them per task.
        cpus = (
            self.cpus_per_task
            or res.get("cpus_per_task")
            or max(int(res.get("cpus", 8 * tasks)) // tasks, 1)
        )
        params: dict[str, Any] = {
            "nodes": nodes,
            "gpus_per_node": gpus or None,
            "ntasks_per_node": tasks,
            "cpus_per_task": int(cpus),
            "time": int(pick(self.time_min, "time_min", default=60 * 24)),
            "signal_delay_s": self.signal_delay_s,
            "partition": pick(self.partition, "partition"),
            "account": self.account,
            "qos": pick(self.qos, "qos"),
            "constraint": pick(self.constraint, "constraint"),
        }
        mem = pick(self.mem_gb, "mem_gb")
        if mem is not None:
            params["mem"] = f"{int(float(mem))}GB"
        if self.setup:
            params["setup"] = list(self.setup)
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return {k: v for k, v in params.items() if v is not None}


def make_executor(
    launcher: str, folder: Path, slurm: dict[str, Any] | None = None
) -> submitit.Executor:
    """A submitit executor writing its files (pickles, logs) into ``folder``."""
    if launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise HCFormerError(
                f"--launcher slurm: no {' or '.join(missing)} on PATH, so no SLURM client on "
                "this machine; run on the cluster's login node, or use --launcher local or inline"
            )
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=100)
        executor.update_parameters(**(slurm or {}))
        return executor
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=60 * 24 * 7)
        return executor
    raise ConfigError(f"launcher {launcher!r}: expected slurm, local or inline")


@dataclass
class JobHandle:
    """A job to wait on: just submitted (``job`` set) or re-attached from ``job.json``."""

    launcher: str
    job_id: str
    folder: Path
    job: Any = None  # a submitit Job when this process submitted it
    pid: int | None = None  # a local job's process
    queue: SlurmQueue | None = None  # the shared squeue listing (slurm); None: ask squeue alone
    submitted: float = 0.0  # epoch seconds; a listing older than this does not judge the job
    last_state: str = ""  # the SLURM state seen last

    @property
    def paths(self) -> JobPaths:
        return JobPaths(self.folder, job_id=self.job_id, task_id=0)

    def done(self) -> bool:
        if self.paths.result_pickle.exists():
            return True
        if self.launcher == "slurm":
            if self.queue is not None:
                state = self.queue.state(self.job_id, since=self.submitted)
            else:
                state = slurm_job_state(self.job_id)
            if state is None:  # SLURM did not answer, or not yet about this job: ask again later
                return False
            self.last_state = state
            return state == "" or state in FINISHED_STATES
        if self.job is not None:
            return bool(self.job.done())
        return self.pid is None or not pid_alive(self.pid)

    def node_failed(self) -> bool:
        """Whether the job ended because its node failed (NODE_FAIL, BOOT_FAIL) without a
        result: the run is not at fault and a new job resumes it."""
        return self.last_state in NODE_FAILURES and not self.paths.result_pickle.exists()

    def error(self) -> str | None:
        """The job's error (submitit's traceback) when it failed, None when it succeeded."""
        path = self.paths.result_pickle
        if not path.exists():
            return "the job ended without a result (killed, cancelled or out of memory?)"
        with contextlib.suppress(Exception):
            outcome, payload = pickle_load(path)
            return None if outcome == "success" else str(payload)
        return f"unreadable result file {path}"

    def logs(self) -> list[Path]:
        return [self.paths.stderr, self.paths.stdout]

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "launcher": self.launcher,
            "job_id": self.job_id,
            "folder": str(Path(self.folder).resolve()),
        }
        if self.pid is not None:
            out["pid"] = self.pid
        return out


def _slurm_state(queue: SlurmQueue, job_id: str, since: float) -> str:
    state = queue.state(job_id, since=since)
    if state is None:  # the cached listing predates the job: wait for a newer one
        queue.wait_newer(since)
        state = queue.state(job_id, since=since)
    if state is None:
        raise HCFormerError(
            f"cannot ask SLURM (squeue) whether job {job_id} recorded in job.json still runs; "
            "try again when squeue answers"
        )
    return state


def reattach(
    job: dict[str, Any] | None, launcher: str, queue: SlurmQueue | None = None
) -> JobHandle | None:
    """A handle on the live job recorded in ``job.json`` when it was made by ``launcher``.

    With ``queue`` (slurm): a job whose submission was cut short (``state: submitting``: the
    process died while sbatch ran, before it could record the id) is found by its unique
    ``job_name`` in a listing taken after the submission began."""
    if not job or job.get("launcher") != launcher or job.get("state") in ("done", "failed"):
        return None
    if launcher == "slurm" and queue is not None:
        since = float(job.get("submit_started") or job.get("submitted") or 0.0)
        if job.get("state") == "submitting":
            if queue.wait_newer(since).get("ok") is not True:
                raise HCFormerError(
                    f"cannot ask SLURM (squeue) whether job {job.get('job_name')} recorded in "
                    "job.json was submitted; try again when squeue answers"
                )
            found = queue.find(str(job.get("job_name")), since=since)
            if found is None:
                return None
            job_id, state = found
        elif job.get("job_id"):
            job_id = str(job["job_id"])
            state = _slurm_state(queue, job_id, since)
            if state == "" or state in FINISHED_STATES:
                return None
        else:
            return None
        return JobHandle(
            launcher, job_id, Path(job["folder"]), queue=queue, submitted=since, last_state=state
        )
    if not job_alive(job):
        return None
    pid = int(job["pid"]) if job.get("pid") else None
    return JobHandle(launcher, str(job["job_id"]), Path(job["folder"]), pid=pid)


class SubmitRefused(HCFormerError):
    """The scheduler refused a submission; ``transient`` when worth retrying after a pause."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def submit(executor: submitit.Executor, launcher: str, folder: Path, fn: Any) -> JobHandle:
    """Submit ``fn``; a refusal by the scheduler (sbatch's error) is one HCFormerError line."""
    # submitit prints sbatch's stderr itself before raising: keep it for the one-line message.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            job = executor.submit(fn)
    except FailedJobError as exc:
        message = " ".join((str(exc) or printed.getvalue()).split()) or "no message"
        raise SubmitRefused(
            f"the scheduler refused the job ({launcher}): {message}",
            transient=bool(TRANSIENT_SUBMIT_ERRORS.search(message)),
        ) from exc
    pid = None
    if launcher == "local":
        process = getattr(job, "_process", None)
        pid = process.pid if process is not None else int(job.job_id)
    return JobHandle(launcher, str(job.job_id), Path(folder), job=job, pid=pid)


def submit_with_retries(
    submit_once: Callable[[], JobHandle],
    attempts: int,
    backoff_s: float,
    record: Callable[[dict[str, Any]], None],
    say: Callable[[str], None] = lambda line: None,
) -> JobHandle:
    """``submit_once()`` until the scheduler takes the job: a transient refusal (a submit limit,
    a busy controller) is retried after ``backoff_s``, doubling up to ``MAX_BACKOFF_S``, at most
    ``attempts`` submissions in all; ``record`` gets each attempt (``at`` and ``job_id`` or
    ``error``) for ``job.json``."""
    attempts = max(int(attempts), 1)
    for attempt in range(1, attempts + 1):
        try:
            handle = submit_once()
        except SubmitRefused as exc:
            record({"at": time.time(), "error": str(exc)})
            if not exc.transient:
                raise
            if attempt == attempts:
                raise SubmitRefused(
                    f"{exc} (refused {attempts} times; is the campaign over a submit limit? "
                    "throttle it with snakemake --resources runs=N)",
                    transient=True,
                ) from exc
            delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            say(f"submission {attempt}/{attempts} refused ({exc}); retrying in {delay:.3g} s")
            time.sleep(delay)
            continue
        record({"at": time.time(), "job_id": handle.job_id})
        return handle
    raise AssertionError("unreachable")
