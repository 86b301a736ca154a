"""The run folder: the one home of the contract between the engine, the launcher, the tracking,
the analysis and the workflow.

``<results>/runs/<exp_id>/seed<k>/`` holds one run (docs/interfaces.md, "The run folder"). Every
part of the project finds a run folder, names its files, writes and reads them, and decides
whether a run is done, running or failed only through this package:

- :mod:`~hcformer.runfolder.paths`: the file names and :func:`run_dir`;
- :mod:`~hcformer.runfolder.files`: atomic writes, the one JSON reader, the commit of the code;
- :mod:`~hcformer.runfolder.job`: ``job.json``, the run-folder lock, the metrics' second name;
- :mod:`~hcformer.runfolder.state`: :class:`RunState` and the liveness of processes and jobs.

Only the standard library (and :mod:`hcformer.errors`): the process that submits and waits,
``hcformer status`` and the Snakefile import it without torch.
"""

from hcformer.runfolder.files import (
    git_commit,
    last_line,
    log_tail,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from hcformer.runfolder.job import (
    RunLock,
    RunLockedError,
    append_job,
    keep_metrics,
    locked,
    read_job,
    restore_metrics,
    update_job,
)
from hcformer.runfolder.paths import (
    CHECKPOINTS,
    CONFIG,
    ERROR_MARKERS,
    FINAL_WEIGHTS,
    JOB,
    JOB_LOCK,
    JOBS,
    LAST_CHECKPOINT,
    LOCK,
    METRICS,
    METRICS_KEEP,
    PREDICTIONS,
    PREV_CHECKPOINT,
    RUN_INFO,
    RUNS,
    SCORES,
    TRAIN_LOG,
    VISUAL,
    results_root,
    run_dir,
    run_info,
    run_log,
)
from hcformer.runfolder.state import (
    FINISHED_STATES,
    RunState,
    RunStatus,
    job_alive,
    pending_slurm_jobs,
    pid_alive,
    run_state,
    slurm_job_state,
    slurm_states,
)

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "ERROR_MARKERS",
    "FINAL_WEIGHTS",
    "FINISHED_STATES",
    "JOB",
    "JOBS",
    "JOB_LOCK",
    "LAST_CHECKPOINT",
    "LOCK",
    "METRICS",
    "METRICS_KEEP",
    "PREDICTIONS",
    "PREV_CHECKPOINT",
    "RUNS",
    "RUN_INFO",
    "SCORES",
    "TRAIN_LOG",
    "VISUAL",
    "RunLock",
    "RunLockedError",
    "RunState",
    "RunStatus",
    "append_job",
    "git_commit",
    "job_alive",
    "keep_metrics",
    "last_line",
    "locked",
    "log_tail",
    "pending_slurm_jobs",
    "pid_alive",
    "read_job",
    "read_json",
    "restore_metrics",
    "results_root",
    "run_dir",
    "run_info",
    "run_log",
    "run_state",
    "slurm_job_state",
    "slurm_states",
    "update_job",
    "write_json_atomic",
    "write_text_atomic",
]
