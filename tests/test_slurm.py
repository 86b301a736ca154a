"""The slurm launcher against a real one-node SLURM (``.ci/slurm-up.sh``; skipped without one).

- a run goes through sbatch, is requeued (``scontrol requeue``) once its first ``last.pt``
  exists, is released (``scontrol update jobid=N StartTime=now``), resumes from ``last.pt`` and
  finishes; the waiting ``hcformer run`` waits through the requeue; the job's log survives it;
- with the real engine: one table at smoke scale through Snakemake with the slurm launcher, so
  every run is an sbatch job, and one real run made longer (a test setting) requeued and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcformer.runfolder import read_job, slurm_job_state

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "up" in out.stdout


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster up (.ci/slurm-up.sh starts one)"),
]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _requeue_once(run: Path, waiter: subprocess.Popen, checkpoint: Path) -> str:
    """Requeue the run's SLURM job once ``checkpoint`` exists, then release it at once."""
    _wait_for(lambda: (read_job(run) or {}).get("job_id"), 120, "job.json with a job id")
    job_id = str(read_job(run)["job_id"])
    _wait_for(checkpoint.exists, 300, f"the first {checkpoint.name}")
    assert waiter.poll() is None, "hcformer run ended before the requeue"
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _wait_for(lambda: slurm_job_state(job_id) == "PENDING", 60, "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    return job_id


def test_requeued_job_resumes_from_last_pt(tmp_path, write_fake_engine):
    engine = write_fake_engine(tmp_path / "pkgs")
    results = tmp_path / "results"
    exp = "ade20k/hcformer-r50-L3-D8-Q100"  # resources only; the stand-in engine trains
    run = results / "runs" / exp / "seed0"
    cmd = [str(BIN / "hcformer"), "run", "--experiment", exp, "--scale", "smoke", "--seed", "0"]
    cmd += ["--results", str(results), "--launcher", "slurm", "--engine", engine, "--poll-s", "1"]
    cmd += ["--gpus-per-node", "1", "--set", "solver.iterations=24"]  # a GPU GRES job
    env = _env(PYTHONPATH=str(tmp_path / "pkgs"), FAKE_ENGINE_SLEEP="0.5")
    waiter = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    job_id = _requeue_once(run, waiter, run / "checkpoints" / "last.pt")
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert err.count("submitted job") == 1  # waited through the requeue, never resubmitted
    starts = (run / "starts.txt").read_text().split("\n")[:-1]
    assert [line.split()[1] for line in starts] == ["-", "1"]  # SLURM_RESTART_COUNT: unset, 1
    iterations = [json.loads(x)["iteration"] for x in (run / "train_log.jsonl").open()]
    assert iterations[-1] == 24 and iterations[0] == 1
    resumed_at = iterations.index(24) + 1 - len(set(iterations))
    assert len(iterations) - len(set(iterations)) <= 1 and resumed_at >= 0  # resumed, not restarted
    job = read_job(run)
    assert job["job_id"] == job_id and job["attempt"] == 2 and job["state"] == "done"
    log = (run / "jobs" / f"{job_id}_0_log.out").read_text()
    assert log.count("Starting with JobEnvironment") == 2  # append mode kept the first attempt
    assert "CANCELLED" in (run / "jobs" / f"{job_id}_0_log.err").read_text()  # the requeue's kill


def test_preemption_signal_checkpoints_through_the_engine_and_requeues(tmp_path, write_fake_engine):
    """SLURM's preemption/time-out signal (USR2) reaches submitit, whose checkpoint() hook asks
    the engine to stop at an iteration boundary and resubmits; the rerun resumes."""
    engine = write_fake_engine(tmp_path / "pkgs")
    results = tmp_path / "results"
    exp = "ade20k/hcformer-r50-L3-D8-Q100"
    run = results / "runs" / exp / "seed2"
    cmd = [str(BIN / "hcformer"), "run", "--experiment", exp, "--scale", "smoke", "--seed", "2"]
    cmd += ["--results", str(results), "--launcher", "slurm", "--engine", engine, "--poll-s", "1"]
    cmd += ["--set", "solver.iterations=24"]
    env = _env(PYTHONPATH=str(tmp_path / "pkgs"), FAKE_ENGINE_SLEEP="0.5")
    waiter = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (read_job(run) or {}).get("state") == "running", 120, "the job to run")
    job_id = str(read_job(run)["job_id"])
    _wait_for((run / "checkpoints" / "last.pt").exists, 120, "the first last.pt")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _wait_for(lambda: slurm_job_state(job_id) == "PENDING", 60, "submitit to requeue the job")
    stopped_at = int((run / "checkpoints" / "last.pt").read_text())
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert 1 <= stopped_at < 24
    iterations = [json.loads(x)["iteration"] for x in (run / "train_log.jsonl").open()]
    assert iterations == list(range(1, 25))  # stopped at a boundary, resumed there exactly
    log = (run / "jobs" / f"{job_id}_0_log.out").read_text()
    assert "Calling checkpoint method" in log and log.count("Starting with JobEnvironment") == 2
    assert read_job(run)["attempt"] == 2 and read_job(run)["state"] == "done"


def test_failed_slurm_job_fails_the_run_with_its_log(tmp_path, write_fake_engine):
    engine = write_fake_engine(tmp_path / "pkgs")
    cmd = [str(BIN / "hcformer"), "run", "--experiment", "ade20k/hcformer-r50-L3-D8-Q100"]
    cmd += [
        "--scale",
        "smoke",
        "--seed",
        "1",
        "--results",
        str(tmp_path / "r"),
        "--launcher",
        "slurm",
    ]
    cmd += ["--engine", engine, "--poll-s", "1"]
    out = subprocess.run(
        cmd,
        env=_env(PYTHONPATH=str(tmp_path / "pkgs"), FAKE_ENGINE_FAIL="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "failed" in out.stderr and "fake-engine: boom, a clear failure" in out.stderr


@pytest.mark.slow
def test_a_table_at_smoke_scale_through_sbatch_and_a_real_requeue(tmp_path):
    """The real engine: table 5 at smoke scale (one seed) through Snakemake with the slurm
    launcher, then a longer run requeued after its first checkpoint and resumed."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name in ("Snakefile", "workflow", "environment.yml"):
        os.symlink(ROOT / name, workdir / name)
    cmd = [str(BIN / "snakemake"), "--cores", "2", "table_table5", "--config", "launcher=slurm"]
    cmd += ["batch_seeds=False", "seeds=[0]"]
    out = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900)
    logs = "\n".join(
        p.read_text()[-2000:] for p in (workdir / "results").rglob("logs/run/**/*.log")
    )
    assert out.returncode == 0, out.stderr[-3000:] + logs
    runs = sorted((workdir / "results" / "smoke" / "runs").glob("*/*/seed0"))
    assert len(runs) == 4
    for run in runs:
        job = read_job(run)
        assert job["launcher"] == "slurm" and job["job_id"].isdigit() and job["state"] == "done"
        assert (run / "jobs" / f"{job['job_id']}_submission.sh").exists()  # an sbatch script
    assert (workdir / "results" / "smoke" / "tables" / "table5.tex").exists()

    # A run made long enough to be requeued after its first checkpoint (48 iterations: several
    # seconds even with the CPU fast paths, while the requeue lands within about one).
    run = (
        workdir
        / "results"
        / "smoke"
        / "runs"
        / "coco_panoptic"
        / "hcformer-r50-L3-D8-Q100"
        / "seed1"
    )
    cmd = [str(BIN / "hcformer"), "run", "--experiment", "coco_panoptic/hcformer-r50-L3-D8-Q100"]
    cmd += ["--scale", "smoke", "--seed", "1", "--results", str(workdir / "results" / "smoke")]
    cmd += ["--launcher", "slurm", "--poll-s", "1", "--set", "solver.iterations=48"]
    cmd += ["--set", "solver.checkpoint_every=2", "--set", "tracking.enabled=false"]
    waiter = subprocess.Popen(cmd, cwd=workdir, env=_env(), stderr=subprocess.PIPE, text=True)
    _requeue_once(run, waiter, run / "checkpoints" / "last.pt")
    _, err = waiter.communicate(timeout=900)
    assert waiter.returncode == 0, err[-3000:]
    job = read_job(run)
    assert job["attempt"] == 2 and job["state"] == "done"
    log = (run / "jobs" / f"{job['job_id']}_0_log.err").read_text()
    assert "resumed from" in log and "last.pt at iteration" in log  # not from scratch
    steps = [json.loads(x).get("iteration") for x in (run / "train_log.jsonl").open()]
    assert steps == list(range(2, 49, 2))  # the resumed log replays, nothing twice
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 48
