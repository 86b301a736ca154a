"""One scheduler query for every waiting run (hcformer.launch.scheduler), against a fake SLURM.

The fake scheduler: shell scripts ``sbatch``, ``squeue``, ``sacct`` and ``srun`` in a folder put
first on PATH. Each appends a line ``<command> <epoch>`` to ``calls.log``; the jobs live in
``jobs/<id>`` files holding ``STATE|NAME`` (a test moves a job along by rewriting its file).
``sbatch`` reads ``--job-name`` from the submission script, numbers jobs from 101 and refuses the
next N submissions with ``refusal``'s text while ``refuse`` holds N > 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcformer.launch.scheduler import SlurmQueue

ROOT = Path(__file__).resolve().parents[1]

_SBATCH = r"""#!/bin/sh
exec 9>"$FAKE_SLURM/lock"; flock 9
echo "sbatch $(date +%s.%N)" >> "$FAKE_SLURM/calls.log"
n=$(cat "$FAKE_SLURM/refuse" 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
    echo $((n - 1)) > "$FAKE_SLURM/refuse"; cat "$FAKE_SLURM/refusal" >&2; exit 1
fi
for a; do script=$a; done
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script" | head -n 1)
id=$(( $(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 100) + 1 ))
echo $id > "$FAKE_SLURM/next_id"
echo "PENDING|$name" > "$FAKE_SLURM/jobs/$id"
echo "Submitted batch job $id"
"""
_SQUEUE = r"""#!/bin/sh
echo "squeue $(date +%s.%N)" >> "$FAKE_SLURM/calls.log"
for f in "$FAKE_SLURM"/jobs/*; do
    [ -e "$f" ] && printf '%s|%s\n' "${f##*/}" "$(cat "$f")"
done
exit 0
"""
_OTHER = """#!/bin/sh
echo "{name} $(date +%s.%N)" >> "$FAKE_SLURM/calls.log"
exit 0
"""


class FakeSlurm:
    """The fake scheduler's folder and what a test does with it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        (root / "jobs").mkdir(parents=True)
        self.bin.mkdir()
        scripts = {"sbatch": _SBATCH, "squeue": _SQUEUE}
        scripts.update({n: _OTHER.format(name=n) for n in ("sacct", "srun", "scontrol")})
        for name, text in scripts.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def env(self) -> dict[str, str]:
        return {"FAKE_SLURM": str(self.root), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}

    def calls(self, command: str) -> list[float]:
        path = self.root / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [float(x.split()[1]) for x in lines if x.split()[0] == command]

    def set_job(self, job_id: str, state: str, name: str = "") -> None:
        path = self.root / "jobs" / str(job_id)
        if not name and path.exists():
            name = path.read_text().strip().split("|", 1)[1]
        path.write_text(f"{state}|{name}\n")

    def job(self, job_id: str) -> tuple[str, str]:
        state, name = (self.root / "jobs" / str(job_id)).read_text().strip().split("|", 1)
        return state, name

    def refuse(self, times: int, text: str) -> None:
        (self.root / "refusal").write_text(text)
        (self.root / "refuse").write_text(str(times))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    fake = FakeSlurm(tmp_path / "fakeslurm")
    for key, value in fake.env().items():
        monkeypatch.setenv(key, value)
    return fake


def test_the_listing_is_parsed_and_a_job_newer_than_it_is_unknown(fake_slurm, tmp_path):
    fake_slurm.set_job("7", "RUNNING", "hc-a")
    fake_slurm.set_job("8", "NODE_FAIL", "hc-b")
    queue = SlurmQueue(tmp_path / "results" / ".scheduler", interval_s=60)
    before = time.time() - 1
    assert queue.state("7") == "RUNNING"
    assert queue.state("8") == "NODE_FAIL"
    assert queue.state("9", since=before) == ""  # not listed by a listing newer than it: ended
    assert queue.state("9", since=time.time() + 1) is None  # submitted after the listing
    assert queue.find("hc-a") == ("7", "RUNNING")
    assert queue.find("hc-b") is None  # ended: nothing to re-attach to
    assert len(fake_slurm.calls("squeue")) == 1  # all of that from one query
    # A second reader of the same results root uses the cached listing.
    assert SlurmQueue(queue.dir, interval_s=60).state("7") == "RUNNING"
    assert len(fake_slurm.calls("squeue")) == 1
    listing = json.loads((queue.dir / "squeue.json").read_text())
    assert listing["ok"] and listing["jobs"]["8"] == {"state": "NODE_FAIL", "name": "hc-b"}


def test_a_run_folder_shares_its_results_roots_listing(tmp_path):
    run = tmp_path / "results" / "paper" / "runs" / "ade20k" / "exp" / "seed0"
    queue = SlurmQueue.for_run_dir(run)
    assert queue.dir == (tmp_path / "results" / "paper" / ".scheduler").resolve()
    assert queue.interval_s == 30.0
    assert (
        SlurmQueue.for_run_dir(tmp_path / "elsewhere").dir
        == (tmp_path / "elsewhere" / ".scheduler").resolve()
    )


_WAITER = """
import sys, time
from hcformer.launch.scheduler import SlurmQueue
cache, job_id, interval, until = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
queue = SlurmQueue(cache, interval_s=interval)
seen = set()
while time.time() < until:
    seen.add(queue.state(job_id))
    time.sleep(0.05)
print(",".join(sorted(map(str, seen))))
"""


@pytest.mark.slow
def test_two_hundred_waiting_runs_make_one_query_per_interval(fake_slurm, tmp_path):
    """200 processes each checking its own job every 0.05 s for a window of W seconds, with a
    poll interval of 0.5 s (the paper scale's 30 s, scaled by 1/60): squeue runs at most
    W / 0.5 + 1 times (30 a minute at scale), not 200 x W / 0.05 times."""
    n, interval = 200, 0.5
    for i in range(n):
        fake_slurm.set_job(str(1000 + i), "RUNNING", f"hc-{i}")
    cache = tmp_path / "results" / ".scheduler"
    start = time.time()
    until = start + 12.0  # the 200 interpreters start within it on 2 cores
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WAITER, str(cache), str(1000 + i), str(interval), str(until)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs if e][:1]
    assert all(o.strip() == "RUNNING" for o, _ in outs), {o.strip() for o, _ in outs}
    calls = fake_slurm.calls("squeue")
    window = max(calls) - start
    assert 2 <= len(calls) <= window / interval + 1, (len(calls), window)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert min(gaps) >= interval * 0.5, gaps  # never two queries within one interval
    assert not fake_slurm.calls("sacct") and not fake_slurm.calls("sbatch")


# --------------------------------------------------------------------------------------
# `hcformer run --launcher slurm` against the fake scheduler: the test plays SLURM (moves the
# job's state, writes the run's metrics.json as the job would). Nothing runs the job itself.

EXP = "ade20k/hcformer-r50-L3-D8-Q100"  # a registry id: the slurm launcher reads its resources
QOS_LIMIT = (
    "sbatch: error: QOSMaxSubmitJobPerUserLimit\n"
    "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy "
    "(job submit limit, user's size and/or time limits)\n"
)


def _run_dir(results: Path) -> Path:
    return results / "runs" / EXP / "seed0"


def _job(run: Path) -> dict:
    try:
        return json.loads((run / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def _start(fake: FakeSlurm, results: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hcformer.cli", "run", "--experiment", EXP, "--scale", "smoke"]
    cmd += ["--seed", "0", "--results", str(results), "--launcher", "slurm", "--poll-s", "0.2"]
    return subprocess.Popen(
        [*cmd, *extra],
        cwd=ROOT,
        env={**os.environ, **fake.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"hcformer run ended ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")  # fmt: skip
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(fake: FakeSlurm, run: Path, job_id: str) -> None:
    """What a job that succeeds leaves: metrics.json (written last), then SLURM's COMPLETED."""
    (run / "metrics.json").write_text(json.dumps({"miou": 1.0}))
    fake.set_job(job_id, "COMPLETED")


def test_a_submit_limit_is_retried_with_back_off_each_attempt_recorded(fake_slurm, tmp_path):
    fake_slurm.refuse(2, QOS_LIMIT)
    results = tmp_path / "results"
    run = _run_dir(results)
    proc = _start(fake_slurm, results, "--retry-backoff-s", "0.3")
    _wait_for(lambda: _job(run).get("state") == "submitted", proc, "the job submitted")
    job = _job(run)
    assert job["job_id"] == "101"
    attempts = job["submissions"]
    assert ["error" in a for a in attempts] == [True, True, False]
    assert "QOSMaxSubmitJobPerUserLimit" in attempts[0]["error"]
    assert attempts[2]["job_id"] == "101"
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.3  # the pause doubles: 0.3 s, then 0.6 s
    assert attempts[2]["at"] - attempts[1]["at"] >= 0.6
    state, name = fake_slurm.job("101")
    assert name == job["job_name"] and name.startswith(f"hc-{EXP}/seed0-")
    fake_slurm.set_job("101", "RUNNING")
    _finish(fake_slurm, run, "101")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "submission 1/8 refused" in err and "retrying in 0.3 s" in err
    assert "submission 2/8 refused" in err and "retrying in 0.6 s" in err
    assert len(fake_slurm.calls("sbatch")) == 3


def test_a_submit_limit_that_lasts_fails_after_the_bounded_attempts(fake_slurm, tmp_path):
    fake_slurm.refuse(10, QOS_LIMIT)
    proc = _start(fake_slurm, tmp_path / "r", "--submit-attempts", "3", "--retry-backoff-s", "0.05")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hcformer run: error: the scheduler refused the job (slurm): ")
    assert "QOSMaxSubmitJobPerUserLimit" in last and "refused 3 times" in last
    assert "--resources runs=N" in last
    assert len(fake_slurm.calls("sbatch")) == 3
    assert len(_job(_run_dir(tmp_path / "r"))["submissions"]) == 3


def test_a_refusal_that_is_not_transient_is_not_retried(fake_slurm, tmp_path):
    fake_slurm.refuse(5, "sbatch: error: Batch job submission failed: Invalid partition name\n")
    proc = _start(fake_slurm, tmp_path / "r", "--retry-backoff-s", "0.05")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Invalid partition name" in err
    assert len(fake_slurm.calls("sbatch")) == 1


def test_a_node_failure_resubmits_the_run_and_records_it(fake_slurm, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    proc = _start(fake_slurm, results)
    _wait_for(lambda: _job(run).get("job_id") == "101", proc, "job 101")
    fake_slurm.set_job("101", "RUNNING")
    fake_slurm.set_job("101", "NODE_FAIL")
    _wait_for(lambda: _job(run).get("job_id") == "102", proc, "a new job after NODE_FAIL")
    job = _job(run)
    assert job["node_failures"][0]["job_id"] == "101"
    assert job["node_failures"][0]["state"] == "NODE_FAIL"
    assert [a["job_id"] for a in job["submissions"]] == ["101", "102"]
    assert fake_slurm.job("102")[1] == job["job_name"] != fake_slurm.job("101")[1]
    _finish(fake_slurm, run, "102")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "job 101 ended NODE_FAIL (its node failed); resubmitting (1/3)" in err


def test_node_failures_beyond_the_bound_fail_the_run(fake_slurm, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    proc = _start(fake_slurm, results, "--node-fail-attempts", "1")
    _wait_for(lambda: _job(run).get("job_id") == "101", proc, "job 101")
    fake_slurm.set_job("101", "BOOT_FAIL")
    _wait_for(lambda: _job(run).get("job_id") == "102", proc, "job 102")
    fake_slurm.set_job("102", "NODE_FAIL")
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert "job 102 failed" in err and "[SLURM state NODE_FAIL]" in err
    assert _job(run)["state"] == "failed" and len(fake_slurm.calls("sbatch")) == 2


def test_a_killed_waiter_is_re_attached_and_nothing_is_submitted_twice(fake_slurm, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    proc = _start(fake_slurm, results)
    _wait_for(lambda: _job(run).get("state") == "submitted", proc, "job 101")
    fake_slurm.set_job("101", "RUNNING")
    proc.kill()  # the login node's process dies; the job runs on
    proc.wait()
    again = _start(fake_slurm, results)
    mine = f'"pid": {again.pid},'
    _wait_for(lambda: mine in (run / ".lock").read_text(), again, "the rerun's lock")
    _wait_for(lambda: "101" in (run / ".lock").read_text(), again, "the lock noting job 101")
    _finish(fake_slurm, run, "101")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert "re-attached to job 101" in err
    assert len(fake_slurm.calls("sbatch")) == 1


def test_a_submission_cut_short_is_found_by_its_job_name(fake_slurm, tmp_path):
    """Killed while sbatch ran: job.json says ``submitting`` with the job's unique name and no
    id; the rerun finds the job in the listing by that name instead of submitting again."""
    results = tmp_path / "results"
    run = _run_dir(results)
    run.mkdir(parents=True)
    name = f"hc-{EXP}/seed0-0123abcd"
    started = time.time() - 5
    (run / "job.json").write_text(json.dumps({
        "launcher": "slurm", "state": "submitting", "job_name": name,
        "submit_started": started, "folder": str(run / "jobs"),
    }))  # fmt: skip
    fake_slurm.set_job("555", "RUNNING", name)
    fake_slurm.set_job("554", "RUNNING", "hc-someone-else")
    proc = _start(fake_slurm, results)
    _wait_for(lambda: _job(run).get("job_id") == "555", proc, "job 555 recorded")
    assert _job(run)["state"] == "submitted"
    _finish(fake_slurm, run, "555")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "re-attached to job 555" in err and not fake_slurm.calls("sbatch")


def test_a_submission_cut_short_before_sbatch_took_it_is_submitted(fake_slurm, tmp_path):
    results = tmp_path / "results"
    run = _run_dir(results)
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({
        "launcher": "slurm", "state": "submitting", "job_name": f"hc-{EXP}/seed0-dead0000",
        "submit_started": time.time() - 5, "folder": str(run / "jobs"),
    }))  # fmt: skip
    proc = _start(fake_slurm, results)
    _wait_for(lambda: _job(run).get("job_id") == "101", proc, "job 101")
    _finish(fake_slurm, run, "101")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(fake_slurm.calls("sbatch")) == 1
