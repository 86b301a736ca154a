"""A SLURM job cancelled mid-run (docs/campaign.md, "Faults"): a real ``scancel`` on the
one-node cluster of ``.ci/slurm-up.sh`` (skipped without one).

Snakemake runs one smoke-scale run through the slurm launcher; its schedule is lengthened in a
copy of ``experiments/`` (``HCFORMER_EXPERIMENTS``; the experiment ids do not change) so that the
job can be cancelled after its first checkpoints. Outcome: the rule fails and shows the job's log
tail; ``hcformer status`` shows the run failed with that log; rerunning the same Snakemake command
submits a new job that resumes from ``last.pt`` (the iterations done are not done again).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXP = "ade20k/hcformer-r50-L3-D8-Q100"
ITERATIONS = 48  # long enough that scancel lands before the end, fast paths and all


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("scancel") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "up" in out.stdout


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster up (.ci/slurm-up.sh starts one)"),
]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"snakemake ended ({proc.returncode}) before {what}:\n{out[-4000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _job(run: Path) -> dict:
    try:
        return json.loads((run / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_cancelled_job_fails_its_rule_and_the_rerun_resumes(tmp_path):
    import torch

    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "workflow", "environment.yml"):
        os.symlink(ROOT / name, work / name)
    experiments = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments", experiments)
    smoke = experiments / "scales" / "smoke.yaml"
    overlay = yaml.safe_load(smoke.read_text())
    overlay["common"].update({"solver.iterations": ITERATIONS, "solver.checkpoint_every": 2})
    smoke.write_text(yaml.safe_dump(overlay))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "HCFORMER_EXPERIMENTS": str(experiments),
    }
    target = f"results/smoke/runs/{EXP}/seed0/metrics.json"
    cmd = [str(BIN / "snakemake"), "--cores", "2", target, "--show-failed-logs"]
    overrides = tmp_path / "slurm.yaml"  # on top of workflow/config.yaml
    overrides.write_text(yaml.safe_dump({"launcher": "slurm", "batch_seeds": False, "seeds": [0]}))
    cmd += ["--configfile", str(overrides)]
    run = work / "results" / "smoke" / "runs" / EXP / "seed0"

    snake = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: _job(run).get("job_id"), 600, "a SLURM job id in job.json", snake)
        job_id = str(_job(run)["job_id"])
        _wait_for((run / "checkpoints" / "prev.pt").exists, 600, "two checkpoints", snake)
        subprocess.run(["scancel", job_id], check=True)
        out, _ = snake.communicate(timeout=600)
    finally:
        if snake.poll() is None:
            snake.kill()
            snake.wait()
    assert snake.returncode != 0, out[-4000:]
    assert f"job {job_id} failed" in out, out[-4000:]  # hcformer run's line, in the failed log
    assert "CANCELLED" in out, out[-4000:]  # the tail of the job's own log
    assert not (run / "metrics.json").exists()
    done_before = int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"])
    assert 2 <= done_before < ITERATIONS

    # `hcformer status` shows it failed, with the job's log and its last line.
    status = subprocess.run(
        [str(BIN / "hcformer"), "status", "--results", "results", "--table", "tableV", "--seeds",
         "0", "--json"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    (mine,) = [r for r in json.loads(status.stdout)["tables"][0]["runs"] if r["experiment"] == EXP]
    assert mine["state"] == "failed" and mine["job_id"] == job_id
    assert mine["log"] == str(run / "jobs" / f"{job_id}_0_log.err")
    text = Path(mine["log"]).read_text()
    assert "CANCELLED" in text  # slurmstepd's line
    assert mine["last_line"] == [x.strip() for x in text.splitlines() if x.strip()][-1]

    # The same command again: a new job that resumes from last.pt.
    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    job = _job(run)
    assert job["state"] == "done" and str(job["job_id"]) != job_id
    log = (run / "jobs" / f"{job['job_id']}_0_log.err").read_text()
    resumed = [x for x in log.splitlines() if "resumed from" in x]
    assert resumed and resumed[0].endswith(f"at iteration {done_before}"), log[-3000:]
    iterations = [json.loads(x)["iteration"] for x in (run / "train_log.jsonl").open()]
    assert iterations == sorted(set(iterations)) and iterations[-1] == ITERATIONS
    assert json.loads((run / "metrics.json").read_text())["iterations"] == ITERATIONS
