"""``hcformer run``: train then evaluate (experiment, seed) runs through a launcher, and wait.

docs/pipeline.md, "One run". One job per run trains then evaluates (one process start):

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

import argparse
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hcformer.errors import ConfigError
from hcformer.experiments import scales
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcformer run",
        description="Train then evaluate runs of an experiment through a launcher, and wait.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--experiment", help="canonical experiment id (hcformer experiments)")
    what.add_argument("--config", help="a config file of one's own instead of --experiment")
    p.add_argument("--scale", required=True, choices=scales())
    seeds = p.add_mutually_exclusive_group(required=True)
    seeds.add_argument("--seed", type=int, help="one seed")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds, one run folder each")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--results", help="the scale's results root; runs go to RESULTS/runs/...")
    where.add_argument("--run-dir", help="the run folder (one seed only)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="inline")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--poll-s",
        type=float,
        default=None,
        help="seconds between job checks; every run under one results root shares one squeue "
        "call per interval (default: 30 at paper scale, else 5)",
    )
    p.add_argument(
        "--submit-attempts",
        type=int,
        default=8,
        help="submissions tried when sbatch refuses for a transient reason (a submit limit, a "
        "busy controller), with a pause doubling from --retry-backoff-s",
    )
    p.add_argument("--retry-backoff-s", type=float, default=60.0)
    p.add_argument(
        "--wait-locked",
        action="store_true",
        help="when a live process holds a run folder's lock, wait for it to end instead of "
        "failing (the workflow's run rule: a restarted campaign meets the waiting processes of "
        "the Snakemake that died)",
    )
    p.add_argument(
        "--node-fail-attempts",
        type=int,
        default=3,
        help="new jobs submitted for a run whose job's node failed (NODE_FAIL, BOOT_FAIL)",
    )
    # The package whose ``train`` and ``evaluate`` modules a job runs (tests use a stand-in).
    p.add_argument("--engine", default="hcformer.engine", help=argparse.SUPPRESS)
    s = p.add_argument_group("slurm (default: the experiment's resources)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument("--nodes", type=int)
    s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--tasks-per-node", type=int, help="DDP processes per node (= GPUs)")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--mem-gb", type=float)
    s.add_argument("--time-min", type=int)
    s.add_argument("--signal-delay-s", type=int, default=120)
    s.add_argument("--setup", action="append", default=[], help="a shell line run before the job")
    s.add_argument("--sbatch", action="append", default=[], metavar="FLAG=VALUE")
    return p


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment's ``Config.resources`` (the registry imports no torch)."""
    if args.config:
        from hcformer.config import load_config

        return dict(load_config(args.config, args.overrides).resources)
    from hcformer.experiments import resolve

    return dict(resolve(args.experiment, args.scale).resources)


def _slurm_params(args: argparse.Namespace) -> dict[str, Any]:
    from hcformer.launch.executors import SlurmOptions

    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--sbatch {item!r}: expected FLAG=VALUE, e.g. --sbatch exclude=node1"
            )
        extra[key.lstrip("-")] = value
    options = SlurmOptions(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        time_min=args.time_min,
        signal_delay_s=args.signal_delay_s,
        setup=args.setup,
        extra=extra,
    )
    return options.resolved(_resources(args))


def _specs(args: argparse.Namespace) -> list[Any]:
    from hcformer.launch.job import RunSpec

    seeds = [args.seed] if args.seed is not None else list(args.seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: a seed appears twice")
    if args.run_dir and len(seeds) != 1:
        raise ConfigError("--run-dir takes one --seed; use --results for several seeds")
    experiment = args.experiment or ""
    if args.config and args.results:
        raise ConfigError("--config needs --run-dir (a config of one's own has no experiment id)")
    specs = []
    for seed in seeds:
        folder = Path(args.run_dir) if args.run_dir else run_dir(args.results, experiment, seed)
        specs.append(
            RunSpec(
                experiment=experiment,
                scale=args.scale,
                seed=seed,
                run_dir=str(folder),
                overrides=list(args.overrides),
                config=args.config or "",
                engine=args.engine,
            )
        )
    return specs


def _run_inline(specs: list[Any], commit: str) -> int:
    from hcformer.launch.job import RunJob

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


def _submit(args: argparse.Namespace, spec: Any, slurm: Any, queue: Any, commit: str) -> Any:
    """Submit one run's job (with retries on transient refusals), recording it in job.json
    before sbatch is called (``state: submitting`` and a unique job name, so that a process
    killed while sbatch runs leaves enough behind to find the job) and after."""
    from hcformer.launch.executors import make_executor, submit, submit_with_retries
    from hcformer.launch.job import RunJob

    run_dir = Path(spec.run_dir)
    folder = run_dir / JOBS

    def once() -> Any:
        name = f"hc-{spec.label}-{uuid.uuid4().hex[:8]}"
        params = {**slurm, "job_name": name} if slurm is not None else None
        executor = make_executor(args.launcher, folder, params)
        started = time.time()
        update_job(
            run_dir,
            launcher=args.launcher,
            job_name=name,
            folder=str(folder.resolve()),
            state="submitting",
            submit_started=started,
        )
        fn = RunJob([spec], threaded=args.launcher == "slurm")
        handle = submit(executor, args.launcher, folder, fn)
        handle.queue, handle.submitted = queue, started
        return handle

    def say(line: str) -> None:
        print(f"hcformer run: {spec.label}: {line}", file=sys.stderr)

    handle = submit_with_retries(
        once,
        args.submit_attempts,
        args.retry_backoff_s,
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


def _run_submitted(
    args: argparse.Namespace, specs: list[Any], locks: list[Any], commit: str
) -> int:
    from hcformer.launch.executors import reattach
    from hcformer.launch.scheduler import SlurmQueue

    slurm = _slurm_params(args) if args.launcher == "slurm" else None
    runs = []
    for spec, lock in zip(specs, locks):
        run_dir = Path(spec.run_dir)
        queue = SlurmQueue.for_run_dir(run_dir, args.poll_s) if slurm is not None else None
        handle = reattach(read_job(run_dir), args.launcher, queue)
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
            handle = _submit(args, spec, slurm, queue, commit)
        lock.note(job_id=handle.job_id, launcher=args.launcher)
        runs.append(_Run(spec, lock, handle))

    pending = list(runs)
    while pending:
        time.sleep(args.poll_s)
        for run in pending:
            run.lock.refresh()
        still = []
        for run in pending:
            if not run.handle.done():
                still.append(run)
                continue
            if (Path(run.spec.run_dir) / METRICS).exists() or not run.handle.node_failed():
                continue
            if run.resubmits >= args.node_fail_attempts:
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
                f"node failed); resubmitting ({run.resubmits}/{args.node_fail_attempts})",
                file=sys.stderr,
            )
            run.handle = _submit(args, run.spec, slurm, lost.queue, commit)
            run.lock.note(job_id=run.handle.job_id, launcher=args.launcher)
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.poll_s is None:
        args.poll_s = 30.0 if args.scale == "paper" else 5.0
    specs = _specs(args)
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
            if not args.wait_locked:
                raise
            if not waiting:
                print(f"hcformer run: {exc}; waiting for it to end", file=sys.stderr)
                waiting = True
            time.sleep(args.poll_s)
            continue
        try:
            for lock in locks:
                if lock.took_over:
                    print(
                        f"hcformer run: {lock.run_dir}: took over a stale lock of pid "
                        f"{lock.took_over.get('pid')} on {lock.took_over.get('host')}",
                        file=sys.stderr,
                    )
            if args.launcher == "inline":
                return _run_inline(todo, commit)
            return _run_submitted(args, todo, locks, commit)
        finally:
            guard.__exit__(None, None, None)
