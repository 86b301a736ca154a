"""Running (experiment, seed) runs through a launcher, and waiting: what ``hcformer run``
(:mod:`hcformer.commands.run`) does.

docs/pipeline.md, "One run". Each run's folder is created first (:func:`create_run`: the config
resolved once and written to the folder), then one job per run trains then evaluates that
folder (one process start):

- ``slurm``: one SLURM job per run through submitit (GPUs, DDP tasks, requeue on preemption and
  time-out; logs opened in append mode so they survive a requeue);
- ``local``: one local process per run (submitit's LocalExecutor);
- ``inline``: in this process, the runs one after another (``--seeds 0 1 2`` pays the torch
  import once: what the ``smoke`` scale needs).

The process that submits and waits imports no torch (about 200 of them sit on a login node at
paper scale). It locks each run folder (a second ``hcformer run`` on it fails with a clear
error; a lock whose holder is dead is taken over), records the job in ``job.json``, re-attaches
to the live job recorded there instead of submitting again, and when a job fails prints the
tail of its log and exits 1. A run folder that already has ``metrics.json`` is up to date.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcformer.engine.runinfo import read_run
from hcformer.errors import ConfigError
from hcformer.launch.create import create_run
from hcformer.launch.executors import (
    SlurmOptions,
    make_executor,
    reattach,
    submit,
    submit_with_retries,
)
from hcformer.launch.job import RunJob, RunSpec
from hcformer.launch.scheduler import SlurmQueue
from hcformer.runfolder import (
    JOBS,
    METRICS,
    RunLockedError,
    append_job,
    git_commit,
    locked,
    log_tail,
    read_job,
    restore_metrics,
    run_dir,
    update_job,
)

LAUNCHERS = ("slurm", "local", "inline")
RESULT_GRACE_S = 30.0  # wait this long for a finished job's files to appear


@dataclass
class Launch:
    """How runs are launched and waited on (the flags of ``hcformer run``).

    Attributes:
      launcher: ``slurm``, ``local`` or ``inline``.
      poll_s: seconds between job checks (every run under one results root shares one
        ``squeue`` call per interval).
      submit_attempts, retry_backoff_s: submissions tried when sbatch refuses for a transient
        reason, with a pause doubling from ``retry_backoff_s``.
      wait_locked: wait for a live holder of a run folder's lock to end instead of failing.
      node_fail_attempts: new jobs submitted for a run whose job's node failed.
      slurm: what a SLURM job asks for (None fields: the run's ``resources``).
    """

    launcher: str = "inline"
    poll_s: float = 5.0
    submit_attempts: int = 8
    retry_backoff_s: float = 60.0
    wait_locked: bool = False
    node_fail_attempts: int = 3
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


def _slurm_params(launch: Launch, spec: RunSpec) -> dict[str, Any]:
    """submitit's SLURM parameters: ``launch.slurm`` over the created run's resources."""
    cfg, _ = read_run(Path(spec.run_dir))
    return launch.slurm.resolved(dict(cfg.resources))


def plan(
    *,
    experiment: str | None,
    config: str | None,
    scale: str,
    seeds: list[int],
    results: str | None,
    run_folder: str | None,
    overrides: list[str],
    engine: str = "hcformer.engine",
) -> list[RunSpec]:
    """The runs of an experiment (or a config file, which needs ``run_folder``) for ``seeds``:
    under ``results`` (``<results>/runs/<exp_id>/seed<k>``) or in ``run_folder`` (one seed)."""
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: a seed appears twice")
    if run_folder and len(seeds) != 1:
        raise ConfigError("--run-dir takes one --seed; use --results for several seeds")
    experiment = experiment or ""
    if config and results:
        raise ConfigError("--config needs --run-dir (a config of one's own has no experiment id)")
    specs = []
    for seed in seeds:
        folder = Path(run_folder) if run_folder else run_dir(results, experiment, seed)
        specs.append(
            RunSpec(
                experiment=experiment,
                scale=scale,
                seed=seed,
                run_dir=str(folder),
                overrides=list(overrides),
                config=config or "",
                engine=engine,
            )
        )
    return specs


def _create(spec: RunSpec) -> None:
    """The run's folder with its resolved config (:func:`create_run`)."""
    create_run(
        spec.run_dir,
        experiment=spec.experiment or None,
        config_file=spec.config or None,
        scale=spec.scale,
        seed=spec.seed,
        overrides=spec.overrides,
    )


def _run_inline(specs: list[RunSpec], commit: str) -> int:
    for spec in specs:
        update_job(
            Path(spec.run_dir),
            launcher="inline",
            job_id=f"inline-{socket.gethostname()}-{os.getpid()}",
            host=socket.gethostname(),
            pid=os.getpid(),
            state="submitted",
            submitted=time.time(),
            git_commit=commit,
        )
    RunJob(specs, threaded=False)()
    return 0


class _Run:
    """One run being waited on: its spec, lock, job handle and node-failure resubmissions."""

    def __init__(self, spec: Any, lock: Any, handle: Any) -> None:
        self.spec, self.lock, self.handle = spec, lock, handle
        self.resubmits = 0


def _submit(launch: Launch, spec: RunSpec, slurm: Any, queue: Any, commit: str) -> Any:
    """Submit one run's job (with retries on transient refusals), recording it in job.json
    before sbatch is called (``state: submitting`` and a unique job name, so that a process
    killed while sbatch runs leaves enough behind to find the job) and after."""
    run_dir = Path(spec.run_dir)
    folder = run_dir / JOBS

    def once() -> Any:
        name = f"hc-{spec.label}-{uuid.uuid4().hex[:8]}"
        params = {**slurm, "job_name": name} if slurm is not None else None
        executor = make_executor(launch.launcher, folder, params)
        started = time.time()
        update_job(
            run_dir,
            launcher=launch.launcher,
            job_name=name,
            folder=str(folder.resolve()),
            state="submitting",
            submit_started=started,
        )
        fn = RunJob([spec], threaded=launch.launcher == "slurm")
        handle = submit(executor, launch.launcher, folder, fn)
        handle.queue, handle.submitted = queue, started
        return handle

    def say(line: str) -> None:
        print(f"hcformer run: {spec.label}: {line}", file=sys.stderr)

    handle = submit_with_retries(
        once,
        launch.submit_attempts,
        launch.retry_backoff_s,
        lambda item: append_job(run_dir, "submissions", item),
        say,
    )
    update_job(
        run_dir,
        **handle.record(),
        host=socket.gethostname(),
        state="submitted",
        state_from=("submitting",),  # a quick job may have recorded ``running`` already
        submitted=time.time(),
        git_commit=commit,
    )
    say(f"submitted job {handle.job_id}")
    return handle


def _run_submitted(launch: Launch, specs: list[RunSpec], locks: list[Any], commit: str) -> int:
    slurm = _slurm_params(launch, specs[0]) if launch.launcher == "slurm" else None
    runs = []
    for spec, lock in zip(specs, locks):
        run_dir = Path(spec.run_dir)
        queue = SlurmQueue.for_run_dir(run_dir, launch.poll_s) if slurm is not None else None
        handle = reattach(read_job(run_dir), launch.launcher, queue)
        if handle is not None:
            # The job may have recorded ``running`` (or more) since: keep that.
            update_job(
                run_dir,
                job_id=handle.job_id,
                host=socket.gethostname(),
                state="submitted",
                state_from=("submitting",),
            )
            print(
                f"hcformer run: {spec.label}: re-attached to job {handle.job_id}", file=sys.stderr
            )
        elif restore_metrics(run_dir) or (run_dir / METRICS).exists():
            # The recorded job (read above) ended since metrics.json was looked for: done.
            print(f"hcformer run: {spec.label}: up to date ({run_dir})", file=sys.stderr)
            continue
        else:
            handle = _submit(launch, spec, slurm, queue, commit)
        lock.note(job_id=handle.job_id, launcher=launch.launcher)
        runs.append(_Run(spec, lock, handle))

    pending = list(runs)
    while pending:
        time.sleep(launch.poll_s)
        for run in pending:
            run.lock.refresh()
        still = []
        for run in pending:
            if not run.handle.done():
                still.append(run)
                continue
            if (Path(run.spec.run_dir) / METRICS).exists() or not run.handle.node_failed():
                continue
            if run.resubmits >= launch.node_fail_attempts:
                continue
            # The node died under the job (NODE_FAIL/BOOT_FAIL): a new job resumes the run.
            run.resubmits += 1
            lost = run.handle
            append_job(
                Path(run.spec.run_dir),
                "node_failures",
                {"at": time.time(), "job_id": lost.job_id, "state": lost.last_state},
            )
            print(
                f"hcformer run: {run.spec.label}: job {lost.job_id} ended {lost.last_state} (its "
                f"node failed); resubmitting ({run.resubmits}/{launch.node_fail_attempts})",
                file=sys.stderr,
            )
            run.handle = _submit(launch, run.spec, slurm, lost.queue, commit)
            run.lock.note(job_id=run.handle.job_id, launcher=launch.launcher)
            still.append(run)
        pending = still

    failed = 0
    for run in runs:
        spec, handle = run.spec, run.handle
        run_dir = Path(spec.run_dir)
        # A shared file system may show a compute node's last files a little late (a job that
        # SLURM says failed, was cancelled or lost its node wrote none: no wait).
        late = handle.last_state in ("", "COMPLETED")
        deadline = time.time() + (RESULT_GRACE_S if late else 0.0)
        while not (run_dir / METRICS).exists() and time.time() < deadline:
            if handle.paths.result_pickle.exists():
                break
            time.sleep(1.0)
        if (run_dir / METRICS).exists():
            # The job records ``done`` itself; one that found the run done already does not.
            update_job(run_dir, state="done", state_from=("submitting", "submitted", "running"))
            continue
        failed += 1
        error = handle.error() or "the job ended without writing metrics.json"
        if handle.last_state:
            error = f"{error} [SLURM state {handle.last_state}]"
        job = read_job(run_dir) or {}
        if job.get("state") not in ("failed",):
            update_job(run_dir, state="failed", heartbeat=time.time())
        last = error.strip().splitlines()[-1] if error.strip() else error
        print(
            f"hcformer run: {spec.label}: job {handle.job_id} failed: {last}\n"
            f"--- last lines of {handle.paths.stderr} ---\n{log_tail(handle.logs())}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def run(specs: list[RunSpec], launch: Launch) -> int:
    """Create, launch and wait for ``specs`` (see the module docstring); 0 when every run has
    its ``metrics.json``, 1 when a job failed."""
    for spec in specs:
        if restore_metrics(Path(spec.run_dir)):
            print(
                f"hcformer run: {spec.label}: metrics.json of the finished run put back (it had "
                "been deleted, e.g. by Snakemake redoing an output it marked incomplete)",
                file=sys.stderr,
            )
    todo = [s for s in specs if not (Path(s.run_dir) / METRICS).exists()]
    for spec in specs:
        if spec not in todo:
            print(f"hcformer run: {spec.label}: up to date ({spec.run_dir})", file=sys.stderr)
    if not todo:
        return 0
    commit = git_commit()
    waiting = False
    while True:
        todo = [s for s in todo if not (Path(s.run_dir) / METRICS).exists()]
        if not todo:
            print("hcformer run: the live holder finished the runs; up to date", file=sys.stderr)
            return 0
        guard = locked([Path(s.run_dir) for s in todo])
        try:
            locks = guard.__enter__()
        except RunLockedError as exc:
            # A waiting process left behind by a dead Snakemake still owns the run: wait for it
            # instead of failing (it submits nothing twice either way).
            if not launch.wait_locked:
                raise
            if not waiting:
                print(f"hcformer run: {exc}; waiting for it to end", file=sys.stderr)
                waiting = True
            time.sleep(launch.poll_s)
            continue
        try:
            for lock in locks:
                if lock.took_over:
                    print(
                        f"hcformer run: {lock.run_dir}: took over a stale lock of pid "
                        f"{lock.took_over.get('pid')} on {lock.took_over.get('host')}",
                        file=sys.stderr,
                    )
            for spec in todo:
                _create(spec)
            if launch.launcher == "inline":
                return _run_inline(todo, commit)
            return _run_submitted(launch, todo, locks, commit)
        finally:
            guard.__exit__(None, None, None)
