"""Where a run folder is and what its files are called: every name, spelt here once.

``<results>/runs/<exp_id>/seed<k>/`` (``<results>`` is a scale's root, e.g. ``results/smoke``)
belongs to one run of one experiment with one seed. What each file holds:
docs/interfaces.md, "The run folder".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcformer.runfolder.files import read_json

RUNS = "runs"  # the folder of a scale's root that holds its run folders

# Written when the run is created (the engine): the resolved config and who the run is.
CONFIG = "config.yaml"
RUN_INFO = "run.json"
# Written by the launcher and the job: the scheduler job that owns the run, and the locks.
JOB = "job.json"
JOB_LOCK = ".job.lock"  # serialises the updates of job.json on one host
LOCK = ".lock"  # held by the process that submits and waits (hcformer run)
JOBS = "jobs"  # submitit's files of the run's jobs (pickles, logs)
# Written while training: the log, the checkpoints, the final weights (training complete).
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREV_CHECKPOINT = "prev.pt"
FINAL_WEIGHTS = "model_final.pt"
# Written by the evaluation, metrics.json last (its presence means the run is done).
PREDICTIONS = "predictions"
SCORES = "scores.json"  # in predictions/: the per-class and per-image details of each metric
VISUAL = "visual"
METRICS = "metrics.json"
# A second name (hard link) of a finished run's metrics.json: when Snakemake deletes the file to
# run the rule again (an output it still marks incomplete after a crash), ``hcformer run`` puts
# the same file back (same content, same inode) instead of evaluating the run again.
METRICS_KEEP = ".metrics.json.keep"
# A run that failed may leave one of these behind.
ERROR_MARKERS = ("error.txt", "FAILED")


def run_dir(results: str | Path, exp_id: str, seed: int | str) -> Path:
    """``<results>/runs/<exp_id>/seed<seed>``; ``seed`` may be a pattern such as ``"{seed}"``
    (the workflow's wildcards)."""
    return Path(results) / RUNS / exp_id / f"seed{seed}"


def run_log(results: str | Path, exp_id: str, seed: int | str | None = None) -> Path:
    """The log of the workflow's run rule: ``<results>/logs/run/<exp_id>/seed<k>.log``, or
    ``<exp_id>.log`` for a rule that runs all seeds of an experiment (``seed`` None)."""
    logs = Path(results) / "logs" / "run"
    return logs / f"{exp_id}.log" if seed is None else logs / exp_id / f"seed{seed}.log"


def results_root(path: str | Path) -> Path | None:
    """The scale's root of a run folder (resolved): the parent of its nearest ``runs``
    ancestor; None when the folder is not under one."""
    path = Path(path).resolve()
    return next((p.parent for p in path.parents if p.name == RUNS), None)


def run_info(path: str | Path) -> dict[str, Any]:
    """``run.json`` of a folder, completed by what its path says (``scale``, ``exp_id`` and
    ``seed`` of ``.../<scale>/runs/<exp_id>/seed<k>``; ``unknown``, the folder's name and 0
    outside that layout)."""
    path = Path(path)
    info = read_json(path / RUN_INFO) or {}
    root = results_root(path)
    if root is not None:
        info.setdefault("scale", root.name)
        info.setdefault("exp_id", "/".join(path.resolve().parent.relative_to(root / RUNS).parts))
    name = path.name
    info.setdefault("seed", int(name[4:]) if name.startswith("seed") and name[4:].isdigit() else 0)
    info.setdefault("scale", "unknown")
    info.setdefault("exp_id", name)
    return info
