"""The run folder's one home (hcformer.runfolder): names, atomic files, state, liveness, lock.

The file names are spelt here again on purpose: they are the contract other tools (Snakemake,
the docs, a user's scripts) rely on, and this is its independent check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hcformer import runfolder
from hcformer.errors import HCFormerError
from hcformer.runfolder import RunState

EXP = "coco_panoptic/hcformer-r50-L3-D8-Q100"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_layout_and_file_names_of_a_run_folder(tmp_path):
    assert runfolder.run_dir(tmp_path, EXP, 2) == tmp_path / "runs" / EXP / "seed2"
    assert str(runfolder.run_dir("results/smoke", "{exp}", "{seed}")) == (
        "results/smoke/runs/{exp}/seed{seed}"
    )
    names = (runfolder.CONFIG, runfolder.RUN_INFO, runfolder.JOB, runfolder.METRICS)
    assert names == ("config.yaml", "run.json", "job.json", "metrics.json")
    assert (runfolder.TRAIN_LOG, runfolder.FINAL_WEIGHTS) == ("train_log.jsonl", "model_final.pt")
    assert (runfolder.METRICS_KEEP, runfolder.LOCK) == (".metrics.json.keep", ".lock")
    assert runfolder.run_log(tmp_path, EXP, 1) == tmp_path / "logs/run" / EXP / "seed1.log"
    assert runfolder.run_log(tmp_path, EXP) == tmp_path / "logs/run" / f"{EXP}.log"


def test_a_folder_says_who_its_run_is_when_run_json_does_not(tmp_path):
    run = runfolder.run_dir(tmp_path / "smoke", EXP, 3)
    run.mkdir(parents=True)
    assert runfolder.results_root(run) == (tmp_path / "smoke").resolve()
    assert runfolder.run_info(run) == {"scale": "smoke", "exp_id": EXP, "seed": 3}
    (run / "run.json").write_text(json.dumps({"exp_id": "mine", "seed": 7}))
    assert runfolder.run_info(run) == {"scale": "smoke", "exp_id": "mine", "seed": 7}
    elsewhere = tmp_path / "loose"
    elsewhere.mkdir()
    assert runfolder.results_root(elsewhere) is None
    assert runfolder.run_info(elsewhere) == {"scale": "unknown", "exp_id": "loose", "seed": 0}


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "run" / "job.json"
    runfolder.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runfolder.write_json_atomic(path, {"new": True})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["job.json"]


def test_the_json_reader_tolerates_a_half_written_file_unless_strict(tmp_path):
    path = tmp_path / "metrics.json"
    assert runfolder.read_json(path) is None
    path.write_text('{"pq": 1')
    assert runfolder.read_json(path) is None
    with pytest.raises(HCFormerError, match=f"{path}: not valid JSON"):
        runfolder.read_json(path, strict=True)
    path.write_text("[1, 2]")
    assert runfolder.read_json(path) is None
    path.write_text('{"pq": 41.5}')
    assert runfolder.read_json(path, strict=True) == {"pq": 41.5}


def test_update_job_keeps_the_state_the_job_recorded_since(tmp_path):
    runfolder.update_job(tmp_path, state="running", job_id="7")
    out = runfolder.update_job(tmp_path, state="submitted", state_from=("submitting",), host="h")
    assert out == {"state": "running", "job_id": "7", "host": "h"}
    runfolder.append_job(tmp_path, "submissions", {"job_id": "7"})
    runfolder.append_job(tmp_path, "submissions", {"job_id": "8"})
    assert runfolder.read_job(tmp_path)["submissions"] == [{"job_id": "7"}, {"job_id": "8"}]


def test_deleted_metrics_are_put_back_from_their_second_name(tmp_path):
    metrics = tmp_path / "metrics.json"
    assert runfolder.restore_metrics(tmp_path) is False  # nothing kept
    metrics.write_text('{"pq": 40.0}\n')
    runfolder.keep_metrics(tmp_path)
    inode = metrics.stat().st_ino
    assert (tmp_path / ".metrics.json.keep").stat().st_ino == inode
    assert runfolder.restore_metrics(tmp_path) is False  # still there: nothing to do
    metrics.unlink()
    assert runfolder.restore_metrics(tmp_path) is True
    assert metrics.stat().st_ino == inode and metrics.read_text() == '{"pq": 40.0}\n'


def test_pid_alive_for_this_process_a_dead_one_a_zombie_and_garbage():
    assert runfolder.pid_alive(os.getpid()) and runfolder.pid_alive(str(os.getpid()))
    assert not runfolder.pid_alive(_dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while runfolder.pid_alive(zombie.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not runfolder.pid_alive(zombie.pid)  # exited, not yet reaped
    zombie.wait()
    assert not any(runfolder.pid_alive(p) for p in (None, "x", 0, -1))


def test_a_local_job_is_alive_while_its_process_is(tmp_path):
    here = {"launcher": "local", "job_id": "1", "host": socket.gethostname()}
    assert runfolder.job_alive({**here, "pid": os.getpid()})
    assert not runfolder.job_alive({**here, "pid": _dead_pid()})
    assert not runfolder.job_alive({**here, "pid": os.getpid(), "state": "done"})
    assert not runfolder.job_alive({**here, "pid": os.getpid(), "host": "another-host"})


def test_the_state_of_a_run_from_its_folder(tmp_path):
    def state(seed: int) -> runfolder.RunStatus:
        return runfolder.run_state(tmp_path, EXP, seed, {}, False)

    assert state(0).state == RunState.NOT_STARTED
    done = runfolder.run_dir(tmp_path, EXP, 1)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    assert state(1).state == "done"
    held = runfolder.run_dir(tmp_path, EXP, 2)
    with runfolder.RunLock(held):
        now = state(2)
    assert (now.state, now.reason) == ("running", f"pid {os.getpid()} holds the run-folder lock")
    marked = runfolder.run_dir(tmp_path, EXP, 3)
    marked.mkdir(parents=True)
    (marked / "error.txt").write_text("loss is nan\n")
    failed = state(3)
    assert (failed.state, failed.reason) == ("failed", "error.txt present")
    assert (failed.log, failed.last_line) == (str(marked / "error.txt"), "loss is nan")
    gone = runfolder.run_dir(tmp_path, EXP, 4)
    gone.mkdir(parents=True)
    job = {"launcher": "local", "pid": _dead_pid(), "host": socket.gethostname()}
    (gone / "job.json").write_text(json.dumps(job))
    assert state(4).state == "failed" and state(4).reason.endswith("is gone")


def test_one_vocabulary_with_the_tables_word_for_a_run_not_started():
    assert [s.value for s in RunState] == ["done", "running", "failed", "not_started"]
    assert [s.table_word for s in RunState] == ["done", "running", "failed", "missing"]
    assert json.dumps({RunState.DONE: RunState.FAILED}) == '{"done": "failed"}'


def test_a_slurm_job_in_the_queue_owns_its_folder_and_a_gone_one_does_not(tmp_path):
    run = runfolder.run_dir(tmp_path, EXP, 0)
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"launcher": "slurm", "job_id": "12"}))
    running = runfolder.run_state(tmp_path, EXP, 0, {"12": "RUNNING"}, True)
    assert (running.state, running.reason) == ("running", "SLURM job 12 RUNNING")
    for ended in ("COMPLETED", "PREEMPTED", "NODE_FAIL"):
        assert runfolder.run_state(tmp_path, EXP, 0, {"12": ended}, True).state == "failed"
    assert runfolder.pending_slurm_jobs(tmp_path, [EXP], [0, 1]) == ["12"]


def test_lock_is_exclusive_between_two_holders_and_a_dead_holders_is_taken_over(tmp_path):
    with (
        runfolder.RunLock(tmp_path / "run"),
        pytest.raises(runfolder.RunLockedError, match="locked by pid"),
    ):
        runfolder.RunLock(tmp_path / "run").acquire()
    with runfolder.RunLock(tmp_path / "run") as again:
        assert again.took_over is None
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "token": "old"}
    (tmp_path / "run" / ".lock").write_text(json.dumps(stale))
    with runfolder.RunLock(tmp_path / "run") as lock:
        assert lock.took_over == stale


def test_last_line_reads_only_the_end_of_a_big_log(tmp_path):
    log = tmp_path / "big.log"
    log.write_text("x" * 1_000_000 + "\nthe end\n\n")
    assert runfolder.last_line(log) == "the end"
    assert runfolder.last_line(tmp_path / "absent.log") == ""


def test_the_package_needs_only_the_standard_library():
    code = (
        "import sys, hcformer.runfolder\n"
        "mods = {m for m in sys.modules if m.startswith('hcformer')}\n"
        "print(sorted(mods - {'hcformer', 'hcformer.errors'}))\n"
        "print('yaml' in sys.modules or 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods, heavy = out.stdout.splitlines()
    assert all(m.startswith("hcformer.runfolder") for m in eval(mods)) and heavy == "False"
