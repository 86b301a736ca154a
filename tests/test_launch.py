"""``hcformer run`` and its launchers (hcformer.launch), on a stand-in engine.

The stand-in: the ``write_fake_engine`` fixture (tests/conftest.py) writes a package
``fakeengine`` (train, evaluate, signals) into a folder. ``hcformer run`` creates each run folder
(the smoke config of a real experiment: 6 iterations unless ``--set solver.iterations=N``); the
stand-in's ``train(run_dir)`` counts the folder's iterations into ``checkpoints/last.pt`` (a text
file), resumes from it, sleeps ``$FAKE_ENGINE_SLEEP`` seconds an iteration, stops at the next
iteration boundary when asked (``signals.request_stop()`` or SIGTERM) and fails when
``$FAKE_ENGINE_FAIL`` is 1; ``evaluate(run_dir)`` writes ``metrics.json``. Every start of train
appends a line to ``starts.txt`` in the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from hcformer import cli
from hcformer.errors import HCFormerError
from hcformer.launch.create import create_run
from hcformer.launch.executors import SlurmOptions
from hcformer.launch.job import RunJob, RunSpec
from hcformer.runfolder import read_job

ROOT = Path(__file__).resolve().parents[1]
REAL_EXP = "ade20k/hcformer-r50-L3-D8-Q100"  # a registry id: its smoke config makes the folder


@pytest.fixture
def engine(tmp_path, monkeypatch, write_fake_engine):
    """The stand-in engine, importable here and in the subprocesses the launchers start."""
    where = tmp_path / "pkgs"
    name = write_fake_engine(where)
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")])
    )
    for mod in [m for m in sys.modules if m.startswith("fakeengine")]:
        del sys.modules[mod]
    yield name
    for mod in [m for m in sys.modules if m.startswith("fakeengine")]:
        del sys.modules[mod]


def _run(engine, results, *extra):
    argv = ["run", "--experiment", REAL_EXP, "--scale", "smoke", "--results", str(results)]
    return cli.main([*argv, "--engine", engine, "--poll-s", "0.2", *extra])


def _subprocess(engine, results, *extra, **kw):
    cmd = [sys.executable, "-m", "hcformer.cli", "run", "--experiment", REAL_EXP]
    cmd += ["--scale", "smoke", "--results", str(results), "--engine", engine, "--poll-s", "0.2"]
    return subprocess.Popen([*cmd, *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True, **kw)


def _run_dir(results, seed):
    return Path(results) / "runs" / REAL_EXP / f"seed{seed}"


def test_inline_batches_seeds_in_one_process(engine, tmp_path):
    results = tmp_path / "results"
    assert _run(engine, results, "--seeds", "0", "1", "2", "--launcher", "inline") == 0
    for seed in (0, 1, 2):
        run = _run_dir(results, seed)
        assert json.loads((run / "metrics.json").read_text())["miou"] == 40.0 + seed
        # Created before the job: the resolved smoke config and who the run is.
        assert json.loads((run / "run.json").read_text())["seed"] == seed
        assert "solver:" in (run / "config.yaml").read_text()
        job = read_job(run)
        assert job["launcher"] == "inline" and job["state"] == "done"
        assert job["pid"] == os.getpid() and job["attempt"] == 1
        assert len(job["git_commit"]) in (40, 7) or job["git_commit"] == "unknown"
        assert not (run / ".lock").exists()
    # One process for all seeds: every train start has this pid.
    pids = {
        line.split()[0] for s in (0, 1, 2) for line in (_run_dir(results, s) / "starts.txt").open()
    }
    assert pids == {str(os.getpid())}


def test_up_to_date_runs_are_not_run_again(engine, tmp_path, capsys):
    results = tmp_path / "results"
    assert _run(engine, results, "--seed", "0") == 0
    assert _run(engine, results, "--seed", "0") == 0
    assert "up to date" in capsys.readouterr().err
    assert len((_run_dir(results, 0) / "starts.txt").read_text().splitlines()) == 1


def test_local_launcher_runs_a_job_and_records_it(engine, tmp_path):
    results = tmp_path / "results"
    assert _run(engine, results, "--seed", "1", "--launcher", "local") == 0
    run = _run_dir(results, 1)
    job = read_job(run)
    assert job["launcher"] == "local" and job["state"] == "done"
    assert job["host"] == socket.gethostname() and job["pid"] != os.getpid()
    assert (run / "starts.txt").read_text().split()[0] != str(os.getpid())  # another process
    assert Path(job["folder"]) == run / "jobs"
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 6  # smoke's


def test_failed_job_fails_with_its_log_tail(engine, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("FAKE_ENGINE_FAIL", "1")
    code = _run(engine, results, "--seed", "0", "--launcher", "local")
    err = capsys.readouterr().err
    assert code == 1
    assert "job" in err and "failed" in err
    assert "fake-engine: boom, a clear failure" in err  # from the job's own log
    assert read_job(_run_dir(results, 0))["state"] == "failed"
    assert not (_run_dir(results, 0) / "metrics.json").exists()


def test_failed_inline_run_is_one_line_exit_2(engine, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_FAIL", "1")
    code = _run(engine, tmp_path / "r", "--seed", "0")
    err = capsys.readouterr().err
    assert code == 2
    assert "hcformer train exited with status 3" in err.splitlines()[-1]


def test_a_live_lock_stops_a_second_run(engine, tmp_path, capsys):
    results = tmp_path / "results"
    run = _run_dir(results, 0)
    run.mkdir(parents=True)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "token": "x", "job_id": "77"}
        (run / ".lock").write_text(json.dumps(lock))
        assert _run(engine, results, "--seed", "0") == 2
        err = capsys.readouterr().err
        assert f"locked by pid {holder.pid}" in err and "job 77" in err
        assert not (run / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its holder is gone now: the lock is stale and taken over.
    assert _run(engine, results, "--seed", "0") == 0
    assert "took over a stale lock" in capsys.readouterr().err
    assert (run / "metrics.json").exists() and not (run / ".lock").exists()


def test_rerun_reattaches_to_the_live_job(engine, tmp_path, monkeypatch):
    """The waiting process dies; its job lives on; a rerun waits on that job, never resubmits."""
    results = tmp_path / "results"
    run = _run_dir(results, 0)
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "0.5")
    iterations = ("--set", "solver.iterations=8")
    first = _subprocess(engine, results, "--seed", "0", "--launcher", "local", *iterations)
    deadline = time.time() + 60
    while not (run / "starts.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    job = read_job(run)
    os.kill(first.pid, signal.SIGKILL)  # the waiter, not its job
    first.wait()
    second = _subprocess(engine, results, "--seed", "0", "--launcher", "local", *iterations)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"re-attached to job {job['job_id']}" in err
    assert "took over a stale lock" in err
    assert len((run / "starts.txt").read_text().splitlines()) == 1
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 8


def test_checkpoint_asks_the_engine_to_save_then_resubmits(engine, tmp_path, monkeypatch):
    """submitit's preemption path: checkpoint() stops training at an iteration boundary and
    returns a resubmission of the same runs, which resumes from last.pt."""
    run = tmp_path / "seed0"
    overrides = ["solver.iterations=50", "tracking.enabled=false"]
    create_run(run, experiment=REAL_EXP, scale="smoke", seed=0, overrides=overrides)
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "0.2")
    spec = RunSpec(REAL_EXP, "smoke", 0, str(run), overrides, engine=engine)
    job = RunJob([spec], threaded=True)
    outcome: list = []
    caller = threading.Thread(target=lambda: outcome.append(job()))
    caller.start()
    while not (run / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    delayed = job.checkpoint()
    caller.join(30)
    saved = int((run / "checkpoints" / "last.pt").read_text())
    assert outcome == [["stopped"]] and 1 <= saved < 50
    assert not (run / "metrics.json").exists() and read_job(run)["state"] == "requeued"
    # The requeued job: same runs; it resumes from last.pt and finishes.
    import fakeengine.signals as sig

    sig._STOP.clear()
    assert delayed.function.specs == [spec]
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "0")
    assert delayed.function() == ["done"]
    iterations = [json.loads(line)["iteration"] for line in (run / "train_log.jsonl").open()]
    assert iterations == list(range(1, 51))  # no iteration redone, none skipped


def test_slurm_options_take_the_experiments_resources():
    params = SlurmOptions(partition="gpu", account="proj").resolved(
        {"gpus": 4, "cpus": 32, "time_hours": 30, "mem_gb": 200}
    )
    assert params["gpus_per_node"] == 4 and params["ntasks_per_node"] == 4
    assert params["cpus_per_task"] == 8  # the node's 32 CPUs shared by its 4 tasks
    assert params["time"] == 30 * 60 and params["mem"] == "200GB"
    assert params["partition"] == "gpu" and params["account"] == "proj"
    assert SlurmOptions(gpus_per_node=2).resolved({"gpus": 8})["gpus_per_node"] == 2
    cpu_only = SlurmOptions().resolved({"gpus": 0, "cpus": 1, "mem_gb": 2, "time_min": 10})
    assert "gpus_per_node" not in cpu_only and cpu_only["ntasks_per_node"] == 1
    assert (cpu_only["cpus_per_task"], cpu_only["mem"], cpu_only["time"]) == (1, "2GB", 10)


def test_the_waiting_process_imports_no_torch():
    code = (
        "import sys\n"
        "from hcformer.launch import run, executors, job\n"
        "import hcformer.runfolder\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, 'heavy import'\n"
        # VmHWM: this process's own peak. ru_maxrss would also count the forked copy of the
        # (torch-laden) pytest process that existed before exec.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(hwm.split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 100_000  # KiB


def _path_without_slurm(*first: Path) -> str:
    """$PATH without the folders that hold a SLURM client (CI's cluster has one)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs = [d for d in dirs if not any((Path(d) / t).exists() for t in ("sbatch", "srun"))]
    return os.pathsep.join([*map(str, first), *dirs])


def _slurm_run(engine, results, *extra):
    argv = ["run", "--experiment", REAL_EXP, "--scale", "smoke", "--results", str(results)]
    return cli.main([*argv, "--seed", "0", "--launcher", "slurm", "--engine", engine, *extra])


def test_slurm_launcher_without_slurm_is_one_line_exit_2(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", _path_without_slurm())
    assert _slurm_run(engine, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("hcformer run: error: --launcher slurm: no sbatch or srun on PATH")
    assert "--launcher local or inline" in err
    with pytest.raises(HCFormerError, match="no sbatch or srun"):  # --debug: the traceback
        _slurm_run(engine, tmp_path / "r", "--debug")


def test_a_refused_sbatch_is_one_line_quoting_the_scheduler(engine, tmp_path, monkeypatch, capsys):
    """sbatch exits 1 with SLURM's two-line refusal: one line, exit 2, its message quoted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    refusal = (
        "sbatch: error: Batch job submission failed: "
        "Invalid account or account/partition combination specified"
    )
    scripts = {
        "sbatch": f"#!/bin/sh\necho 'sbatch: error: invalid account: nope' >&2\necho '{refusal}' >&2\nexit 1\n",
        "srun": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", _path_without_slurm(bin_dir))
    assert _slurm_run(engine, tmp_path / "r", "--account", "nope") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        "hcformer run: error: the scheduler refused the job (slurm): "
        f"sbatch: error: invalid account: nope {refusal}\n"
    )
    assert not (_run_dir(tmp_path / "r", 0) / ".lock").exists()


def test_a_closed_pipe_ends_the_command_quietly():
    """`hcformer experiments --json | head -1`: no BrokenPipeError, nothing on stderr."""
    cmd = f"{sys.executable} -m hcformer.cli experiments --json | head -1"
    out = subprocess.run(
        ["bash", "-c", cmd + "; echo status=${PIPESTATUS[0]} >&2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout == "[\n"
    assert out.stderr == "status=141\n"  # 128 + SIGPIPE, like any Unix tool; no traceback


def test_a_broken_pipe_elsewhere_is_not_swallowed(monkeypatch):
    """Only a closed stdout ends a command quietly; a BrokenPipeError of another pipe or socket
    (an MLflow server going away) still surfaces."""
    module = types.ModuleType("hcformer_test_broken_pipe")

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")

    module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "pipe-test", (module.__name__, "raises BrokenPipeError"))
    with pytest.raises(BrokenPipeError):
        cli.main(["pipe-test"])


# --------------------------------------------------------------------------------------
# `hcformer campaign`: a restart after the login side died keeps what finished.

_TINY_SNAKEFILE = """
rule run:
    output: "results/runs/d/e/seed0/metrics.json"
    shell: "echo $RANDOM > {output}.tmp && mv {output}.tmp {output} && sleep $(cat delay)"
"""


def _killed_campaign(work: Path, *launcher: str) -> Path:
    """A tiny workflow whose rule writes metrics.json, then is killed (SIGKILL, whole session)
    before Snakemake sees the rule end: Snakemake's lock and incomplete marker stay behind."""
    work.mkdir()
    (work / "Snakefile").write_text(_TINY_SNAKEFILE)
    (work / "delay").write_text("60")
    out = work / "results/runs/d/e/seed0/metrics.json"
    proc = subprocess.Popen(
        [*launcher, "--cores", "1", str(out.relative_to(work))],
        cwd=work, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.exists() and any((work / ".snakemake" / "locks").iterdir())
    assert any(p.is_file() for p in (work / ".snakemake" / "incomplete").rglob("*"))
    (work / "delay").write_text("0")
    return out


HC = [sys.executable, "-m", "hcformer.cli"]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def test_the_cause_rerun_incomplete_redoes_a_finished_run(tmp_path):
    """Why a restarted campaign evaluated finished runs again: their metrics.json is still
    marked incomplete, and rerun-incomplete (the slurm profile's) deletes and remakes it."""
    out = _killed_campaign(tmp_path / "w", SNAKEMAKE)
    before = out.read_text(), out.stat().st_mtime_ns
    subprocess.run([SNAKEMAKE, "--unlock"], cwd=tmp_path / "w", check=True, capture_output=True)
    target = str(out.relative_to(tmp_path / "w"))
    subprocess.run([SNAKEMAKE, "--cores", "1", "--rerun-incomplete", target], cwd=tmp_path / "w",
                   check=True, capture_output=True)  # fmt: skip
    assert out.stat().st_mtime_ns != before[1]


def test_campaign_restart_unlocks_a_dead_campaign_and_keeps_finished_runs(tmp_path):
    work = tmp_path / "w"
    out = _killed_campaign(work, *HC, "campaign")
    before = out.read_bytes(), out.stat().st_mtime_ns
    cmd = [*HC, "campaign", "--cores", "1", "--rerun-incomplete", str(out.relative_to(work))]
    again = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removed Snakemake's lock left by the campaign of pid" in again.stderr
    assert "1 finished runs kept" in again.stderr
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before  # not made again
    assert not (work / ".snakemake" / "hcformer-campaign.json").exists()  # released at the end


def test_campaign_never_unlocks_a_live_or_unknown_holder(tmp_path):
    work = tmp_path / "w"
    (work / ".snakemake" / "locks").mkdir(parents=True)
    (work / ".snakemake" / "locks" / "0.output.lock").write_text("x")
    out = subprocess.run([*HC, "campaign", "--cores", "1"], cwd=work, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "Snakemake's lock is held (no hcformer campaign)" in out.stderr
    assert "`snakemake --unlock`" in out.stderr
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    (work / ".snakemake" / "hcformer-campaign.json").write_text(json.dumps(record))
    out = subprocess.run([*HC, "campaign", "--cores", "1"], cwd=work, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2
    assert f"a campaign is running here (pid {os.getpid()}" in out.stderr
    assert any((work / ".snakemake" / "locks").iterdir())  # left alone


def test_a_finished_runs_deleted_metrics_are_put_back_not_made_again(engine, tmp_path, capsys):
    """Snakemake deletes an output it redoes; a finished run's metrics.json comes back from its
    hard link (same inode: same bytes) without training or evaluating again."""
    results = tmp_path / "r"
    assert _run(engine, results, "--seed", "0") == 0
    run = _run_dir(results, 0)
    metrics = run / "metrics.json"
    before = metrics.read_bytes(), metrics.stat().st_ino
    assert (run / ".metrics.json.keep").stat().st_ino == before[1]
    metrics.unlink()
    capsys.readouterr()
    assert _run(engine, results, "--seed", "0") == 0
    assert (metrics.read_bytes(), metrics.stat().st_ino) == before
    assert len((run / "starts.txt").read_text().splitlines()) == 1  # trained once
    assert "metrics.json of the finished run put back" in capsys.readouterr().err
    (run / ".metrics.json.keep").unlink()  # without it, a deleted metrics.json is made again
    metrics.unlink()
    assert _run(engine, results, "--seed", "0") == 0
    assert metrics.exists() and len((run / "starts.txt").read_text().splitlines()) == 2
