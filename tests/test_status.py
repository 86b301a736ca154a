"""``hcformer status`` (docs/campaign.md) on results trees shaped like ``snakemake all_tables``'s.

The tree: one run folder per (experiment, seed) of every paper table at smoke scale, holding
what the pipeline writes (``config.yaml``, ``run.json``, ``job.json``, ``train_log.jsonl``,
``metrics.json``). Faults are made with real files (a failed job's log, a removed folder) and
real processes (a live lock holder, a dead pid); SLURM is asked through ``squeue`` on PATH.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcformer import cli
from hcformer.experiments import load_tables

SEEDS = (0, 1, 2)


def needed_runs() -> dict[str, set[tuple[str, int]]]:
    """table id -> the (experiment, seed) runs it needs (independent of status.py)."""
    out = {}
    for table in load_tables():
        ids = {i for row in table.rows for i in row.experiment_ids}
        out[table.id] = {(e, s) for e in ids for s in SEEDS}
    return out


def write_done_run(root: Path, exp: str, seed: int) -> Path:
    run = root / "runs" / exp / f"seed{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {num_classes: 8}\n")
    info = {"exp_id": exp, "seed": seed, "scale": "smoke", "git_commit": "abc"}
    (run / "run.json").write_text(json.dumps(info))
    job = {"launcher": "inline", "job_id": f"inline-x-{seed}", "host": "elsewhere", "pid": 1}
    (run / "job.json").write_text(json.dumps({**job, "state": "done", "heartbeat": 1.0}))
    (run / "train_log.jsonl").write_text('{"iteration": 6, "loss": 1.0}\n')
    (run / "metrics.json").write_text(json.dumps({"pq": 1.0, "miou": 2.0, "ap": 3.0}))
    return run


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> Path:
    """``results/smoke`` with every run of every table done."""
    results = tmp_path_factory.mktemp("status") / "results"
    for exp, seed in set().union(*needed_runs().values()):
        write_done_run(results / "smoke", exp, seed)
    return results


def _status_json(results: Path, *extra: str, capsys) -> dict:
    assert (
        cli.main(["status", "--results", str(results), "--scale", "smoke", "--json", *extra]) == 0
    )
    return json.loads(capsys.readouterr().out)


def test_a_complete_smoke_tree_shows_every_table_complete(full_tree, capsys):
    report = _status_json(full_tree, capsys=capsys)
    expected = needed_runs()
    assert {t["id"] for t in report["tables"]} == set(expected)
    for table in report["tables"]:
        assert table["complete"], table["id"]
        assert table["done"] == table["total"] == len(expected[table["id"]]) > 0
        assert table["running"] == table["failed"] == table["not_started"] == 0
    unique = set().union(*expected.values())
    assert report["totals"] == {
        "done": len(unique), "running": 0, "failed": 0, "not_started": 0, "total": len(unique)
    }  # fmt: skip
    assert report["failed"] == []
    assert cli.main(["status", "--results", str(full_tree), "--scale", "smoke"]) == 0
    text = capsys.readouterr().out
    assert text.count("  complete") == len(expected)


def test_status_is_fast_and_imports_no_torch(full_tree):
    """A fresh process on the whole tree; CPU time is the bound (the wall clock of a shared
    machine is not), with a loose wall-clock bound besides."""
    code = (
        "import sys\nfrom hcformer.cli import main\n"
        f"rc = main(['status', '--results', {str(full_tree)!r}, '--scale', 'smoke'])\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'pandas', 'timm') if m in sys.modules)\n"
        "print('HEAVY', heavy)\nsys.exit(rc)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert cpu < 2.0, f"hcformer status took {cpu:.2f} s of CPU"
    assert wall < 20.0, f"hcformer status took {wall:.1f} s of wall-clock time"


def test_failed_running_and_missing_runs_are_shown_as_such(full_tree, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(full_tree, results, symlinks=True)
    root = results / "smoke" / "runs"
    table = "table5"
    exps = sorted({e for e, _ in needed_runs()[table]})
    failed_exp, missing_exp, running_exp, dead_exp = exps[:4]

    # Failed: the launcher marked it, and the rule's log ends with the engine's error.
    run = root / failed_exp / "seed1"
    (run / "metrics.json").unlink()
    job = json.loads((run / "job.json").read_text())
    (run / "job.json").write_text(json.dumps({**job, "state": "failed"}))
    log = results / "smoke" / "logs" / "run" / failed_exp / "seed1.log"
    log.parent.mkdir(parents=True)
    log.write_text("hcformer train: it 2/6 loss 3.1\nhcformer run: error: loss_dice is nan\n\n")
    # Not started: no folder at all.
    shutil.rmtree(root / missing_exp / "seed2")
    # Running: the run-folder lock is held by a live process on this host (this one).
    run = root / running_exp / "seed0"
    (run / "metrics.json").unlink()
    (run / "job.json").write_text(json.dumps({"state": "running", "launcher": "inline"}))
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    # Dead: job.json says running but its local process is gone, and its log says why.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = root / dead_exp / "seed0"
    (run / "metrics.json").unlink()
    jobs = run / "jobs"
    jobs.mkdir()
    (jobs / "77_0_log.err").write_text("Traceback ...\nRuntimeError: CUDA error: out of memory\n")
    (run / "job.json").write_text(
        json.dumps(
            {
                "state": "running",
                "launcher": "local",
                "job_id": "77",
                "pid": dead.pid,
                "host": socket.gethostname(),
                "folder": str(jobs),
            }
        )  # fmt: skip
    )
    old = time.time() - 3600
    for name in ("job.json", "train_log.jsonl"):
        os.utime(run / name, (old, old))

    report = _status_json(results, "--table", table, capsys=capsys)
    (t5,) = report["tables"]
    assert (t5["done"], t5["running"], t5["failed"], t5["not_started"]) == (
        len(needed_runs()[table]) - 4, 1, 2, 1
    )  # fmt: skip
    assert not t5["complete"]
    by_run = {(r["experiment"], r["seed"]): r for r in t5["runs"]}
    assert by_run[(missing_exp, 2)]["state"] == "not_started"
    assert by_run[(running_exp, 0)]["state"] == "running"
    assert str(os.getpid()) in by_run[(running_exp, 0)]["reason"]
    failed = by_run[(failed_exp, 1)]
    assert failed["state"] == "failed" and failed["log"] == str(log)
    assert failed["last_line"] == "hcformer run: error: loss_dice is nan"
    gone = by_run[(dead_exp, 0)]
    assert gone["state"] == "failed" and f"pid {dead.pid} is gone" in gone["reason"]
    assert gone["log"] == str(jobs / "77_0_log.err")
    assert gone["last_line"] == "RuntimeError: CUDA error: out of memory"

    assert cli.main(["status", "--results", str(results / "smoke"), "--table", table]) == 0
    text = capsys.readouterr().out
    assert f"{failed_exp}/seed1: job.json: state failed" in text
    assert f"log: {log}" in text and "last line: hcformer run: error: loss_dice is nan" in text


def test_slurm_is_asked_about_recorded_jobs(tmp_path, monkeypatch, capsys):
    """``squeue`` (a stand-in on PATH that logs its arguments) decides running vs failed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "squeue").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "4242 PENDING"\n')
    (bin_dir / "sacct").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "4343|CANCELLED by 0"\n')
    for tool in ("squeue", "sacct"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / "results" / "smoke"
    exps = sorted({e for e, _ in needed_runs()["table5"]})
    for exp, job_id in zip(exps, ("4242", "4343")):
        run = write_done_run(results, exp, 0)
        (run / "metrics.json").unlink()
        (run / "job.json").write_text(
            json.dumps(
                {
                    "launcher": "slurm",
                    "job_id": job_id,
                    "state": "running",
                    "folder": str(run / "jobs"),
                    "heartbeat": time.time(),
                }
            )  # fmt: skip
        )
    report = _status_json(tmp_path / "results", "--table", "table5", "--seeds", "0", capsys=capsys)
    by_exp = {r["experiment"]: r for r in report["tables"][0]["runs"]}
    assert by_exp[exps[0]]["state"] == "running" and "4242 PENDING" in by_exp[exps[0]]["reason"]
    assert by_exp[exps[1]]["state"] == "failed"
    assert "SLURM job 4343 CANCELLED" in by_exp[exps[1]]["reason"]
    asked = calls.read_text().splitlines()
    assert any("4242,4343" in line for line in asked)  # one squeue call for all recorded ids


def test_nothing_started_and_an_unknown_table(tmp_path, capsys):
    report = _status_json(tmp_path / "nothing", "--table", "table5", capsys=capsys)
    (t5,) = report["tables"]
    assert t5["not_started"] == t5["total"] == len(needed_runs()["table5"]) and not t5["complete"]
    assert cli.main(["status", "--results", str(tmp_path), "--table", "table99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown table 'table99'" in err[0]
