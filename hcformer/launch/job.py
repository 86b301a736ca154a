"""What one job runs: train, then evaluate, for one or more (experiment, seed) run folders.

A run trains and then evaluates in one job, at every scale (one process start, one queue wait,
one GPU allocation). The folder was created before the job (:mod:`hcformer.launch.create`) and
holds everything the job needs: it calls the engine's ``train.train(run_dir)`` and
``evaluate.evaluate(run_dir)``. :class:`RunJob` is the callable that submitit pickles and runs
on the compute node (``slurm``, ``local``) or that ``hcformer run --launcher inline`` calls
in-process; the engine is imported only inside it, so the process that submits and waits never
imports torch.

Preemption and time-out (docs/pipeline.md, "One run"): under submitit the
signal (USR2) reaches submitit's handler, which calls :meth:`RunJob.checkpoint`. That asks the
engine to save at the next iteration boundary (``hcformer.engine.signals.request_stop``), waits
for it, and hands submitit a resubmission of the same job: the requeued job reruns the same
command, which resumes from ``checkpoints/last.pt``. So that the signal handler can wait for the
save, the work runs in a worker thread while the main thread waits.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from hcformer.errors import HCFormerError
from hcformer.runfolder import METRICS, keep_metrics, read_job, update_job

HEARTBEAT_EVERY_S = 30.0
SAVE_TIMEOUT_S = 60.0  # at most this long for the engine to save after a preemption signal


@dataclass
class RunSpec:
    """One run: an experiment of the registry (or a config file of one's own) and a seed; what
    creates its folder. The job itself uses only ``run_dir`` and ``engine``."""

    experiment: str
    scale: str
    seed: int
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    config: str = ""  # a config file instead of --experiment
    # The package whose train, evaluate and signals modules run (tests: a stand-in).
    engine: str = "hcformer.engine"

    @property
    def label(self) -> str:
        return f"{self.experiment or self.config}/seed{self.seed}"


class JobFailed(HCFormerError):
    """A step of a run exited with an error (the job's log holds the details)."""


def _rank() -> int:
    for key in ("SLURM_PROCID", "RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _attempt() -> int:
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(restarts) + 1 if restarts.isdigit() else 1


def _request_stop(engine: str) -> None:
    """Ask the engine to save at the next iteration boundary and return (its ``signals`` hook)."""
    importlib.import_module(f"{engine}.signals").request_stop()


def _heartbeat(run_dir: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_EVERY_S):
        with contextlib.suppress(OSError):
            update_job(run_dir, heartbeat=time.time())


def run_one(spec: RunSpec, *, stopping: threading.Event | None = None) -> str:
    """Train then evaluate one run folder; returns ``done``, ``skipped`` or ``stopped``.

    Calls the engine in this process (``train(run_dir)`` then, on the main process,
    ``evaluate(run_dir)``); a rerun resumes training from ``last.pt`` (the engine's job) and a
    folder that already has metrics is left alone.
    """
    run_dir = Path(spec.run_dir)
    if (run_dir / METRICS).exists():
        return "skipped"
    rank0 = _rank() == 0
    beat = threading.Event()
    if rank0:
        update_job(
            run_dir,
            state="running",
            node=socket.gethostname(),
            attempt=_attempt(),
            heartbeat=time.time(),
            started=time.time(),
        )
        threading.Thread(target=_heartbeat, args=(run_dir, beat), daemon=True).start()
    try:
        train = importlib.import_module(f"{spec.engine}.train")
        code = int(train.train(run_dir).exit_code)
        if stopping is not None and stopping.is_set():
            return "stopped"
        if code != 0:
            raise JobFailed(f"{spec.label}: hcformer train exited with status {code}")
        if rank0:
            evaluate = importlib.import_module(f"{spec.engine}.evaluate")
            evaluate.evaluate(run_dir)
            if not (run_dir / METRICS).exists():
                raise JobFailed(f"{spec.label}: evaluation wrote no {run_dir / METRICS}")
            keep_metrics(run_dir)
    except BaseException:
        if rank0 and not (stopping is not None and stopping.is_set()):
            with contextlib.suppress(OSError):
                update_job(run_dir, state="failed", heartbeat=time.time())
        raise
    finally:
        beat.set()
    if rank0:
        update_job(run_dir, state="done", heartbeat=time.time(), finished=time.time())
    return "done"


class RunJob(submitit.helpers.Checkpointable):
    """The job: ``run_one`` for each spec in turn (the seeds of an experiment, batched).

    Arguments:
      specs: the runs, done one after another in this process.
      threaded: run the work in a worker thread so that :meth:`checkpoint` (called by submitit's
        signal handler in the main thread) can wait for the engine to save.
    """

    def __init__(self, specs: list[RunSpec], *, threaded: bool = True) -> None:
        self.specs = list(specs)
        self.threaded = threaded
        self._stopping: threading.Event | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"specs": self.specs, "threaded": self.threaded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["specs"], threaded=state["threaded"])

    def _work(self, results: list[str], errors: list[BaseException]) -> None:
        try:
            for spec in self.specs:
                results.append(run_one(spec, stopping=self._stopping))
                if results[-1] == "stopped":
                    return
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    def __call__(self) -> list[str]:
        self._stopping = threading.Event()
        results: list[str] = []
        errors: list[BaseException] = []
        if not self.threaded:
            self._work(results, errors)
        else:
            self._worker = threading.Thread(target=self._work, args=(results, errors))
            self._worker.start()
            while self._worker.is_alive():
                self._worker.join(0.5)
        if errors:
            raise errors[0]
        return results

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Preempted or timed out: let the engine save, then resubmit the same job (it resumes)."""
        if self._stopping is not None:
            self._stopping.set()
        try:
            _request_stop(self.specs[0].engine)
        except (
            ImportError,
            AttributeError,
        ):  # the engine is not there: resume from the last periodic last.pt
            print("hcformer run: engine has no stop hook; resuming from last.pt", file=sys.stderr)
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(SAVE_TIMEOUT_S)
        for spec in self.specs:
            if read_job(spec.run_dir) is not None and _rank() == 0:
                with contextlib.suppress(OSError):
                    update_job(Path(spec.run_dir), state="requeued", heartbeat=time.time())
        return submitit.helpers.DelayedSubmission(RunJob(self.specs, threaded=self.threaded))
