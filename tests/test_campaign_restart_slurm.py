"""A campaign whose login side dies half-way restarts at no cost: a real one-node SLURM of
``.ci/slurm-up.sh`` (skipped without one).

``hcformer campaign`` runs the 12 smoke runs of Table V (4 experiments x 3 seeds, one SLURM job
each, ``--rerun-incomplete`` as in the slurm profile). Once some runs have finished and others
are queued or running, every process of the campaign's session is killed (``SIGKILL``: Snakemake,
the shells, every waiting ``hcformer run``, as when the login node reboots); the SLURM jobs run
on. The same command again must: remove Snakemake's stale lock itself, keep every finished run
(its ``metrics.json`` byte for byte, same mtime), re-attach to every queued or running job, and
finish the campaign with exactly one ``sbatch`` per run (counted by a wrapper first on PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENTS = [f"ade20k/hcformer-r50-L{k}-D8-Q100" for k in range(4)]  # Table V
SEEDS = (0, 1, 2)


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "up" in out.stdout


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster up (.ci/slurm-up.sh starts one)"),
]


def _kill_session(leader: int) -> None:
    """SIGKILL every process of ``leader``'s session (what a reboot does to the login side)."""
    for _ in range(3):
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            try:
                if pid != os.getpid() and os.getsid(pid) == leader:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        time.sleep(0.2)


def _job(run: Path) -> dict:
    try:
        return json.loads((run / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_campaign_killed_half_way_restarts_without_redoing_or_resubmitting(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "workflow", "environment.yml"):
        os.symlink(ROOT / name, work / name)
    wrap = tmp_path / "wrap"  # counts sbatch calls, then hands over to SLURM's
    wrap.mkdir()
    sbatch_log = tmp_path / "sbatch.log"
    (wrap / "sbatch").write_text(
        f'#!/bin/sh\necho "$(date +%s.%N)" >> {sbatch_log}\nexec {shutil.which("sbatch")} "$@"\n'
    )
    (wrap / "sbatch").chmod(0o755)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(wrap), str(BIN), os.environ["PATH"]]),
        "OMP_NUM_THREADS": "1",
    }
    overrides = tmp_path / "slurm.yaml"
    overrides.write_text(yaml.safe_dump({"launcher": "slurm", "batch_seeds": False}))
    runs = [
        work / "results" / "smoke" / "runs" / e / f"seed{s}" for e in EXPERIMENTS for s in SEEDS
    ]
    targets = [str(r.relative_to(work) / "metrics.json") for r in runs]
    cmd = [str(BIN / "hcformer"), "campaign", *targets, "--cores", "12", "--rerun-incomplete"]
    cmd += ["--configfile", str(overrides)]  # nargs=+: last

    first = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 900
        while True:
            done = [r for r in runs if (r / "metrics.json").exists()]
            waiting = [r for r in runs if r not in done and _job(r).get("job_id")]
            if len(done) >= 3 and waiting:
                break
            if first.poll() is not None:
                raise AssertionError(f"the campaign ended early:\n{first.stdout.read()[-4000:]}")
            assert time.time() < deadline, "timed out waiting for half the campaign"
            time.sleep(0.2)
    finally:
        _kill_session(first.pid)
        first.wait()
    assert len(done) < len(runs), "every run finished before the kill: nothing was tested"
    kept = {r: ((r / "metrics.json").stat().st_mtime_ns, (r / "metrics.json").read_bytes())
            for r in done}  # fmt: skip
    jobs_before = {r: str(_job(r)["job_id"]) for r in runs if _job(r).get("job_id")}
    assert (work / ".snakemake" / "locks").is_dir() and any((work / ".snakemake/locks").iterdir())

    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-5000:]
    assert "removed Snakemake's lock left by the campaign of pid" in log, log[-3000:]

    for r in runs:
        assert (r / "metrics.json").exists(), r
        job = _job(r)
        assert job["state"] == "done", (r, job, log[-3000:])
        assert len([a for a in job.get("submissions", []) if "job_id" in a]) == 1, (r, job)
    for r, (mtime, content) in kept.items():  # no finished run evaluated again
        assert (r / "metrics.json").stat().st_mtime_ns == mtime, r
        assert (r / "metrics.json").read_bytes() == content, r
    for r, job_id in jobs_before.items():  # every recorded job re-attached, none replaced
        assert str(_job(r)["job_id"]) == job_id, r
    assert len(sbatch_log.read_text().splitlines()) == len(runs)  # one submission per run
