"""Faults of a multi-day campaign, each injected for real, each with a defined outcome.

docs/campaign.md, "Faults: what happens, what is lost", lists them for users.

The real engine trains one smoke-scale experiment (a tiny HCFormer R50 on 16 synthetic ADE20K
images) into run folders under ``tmp``; the faults are real:

- a NaN in a loss term at a known iteration (the criterion's output multiplied by NaN);
- a node that dies mid-run (SIGKILL of ``hcformer run``: its lock and job.json stay behind),
  while a second ``hcformer run`` of the same folder is refused (a double submission);
- ``last.pt`` truncated (a real short file), the disk full while a checkpoint is written
  (``RLIMIT_FSIZE`` in the child process: the kernel refuses the write);
- an MLflow store that cannot be reached (a real wrong URI: nothing listens there);
- an unreadable image and label file (truncated / garbage bytes).

docs/campaign.md has the table fault -> outcome -> what is lost. SLURM's ``scancel`` is in
``test_faults_slurm.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcformer import cli

EXP = "ade20k/hcformer-r50-L3-D8-Q100"  # smoke scale: tiny R50, tiny images, batch 6
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------
# Shared set-up: the data once per module, helpers to run and to read checkpoints.


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from hcformer.data import build_dataset
    from hcformer.data.synthetic import write_synthetic
    from hcformer.experiments import resolve

    root = tmp_path_factory.mktemp("faultdata") / "ade20k"
    cfg = resolve(EXP, "smoke")
    write_synthetic("ade20k", root, 16, cfg.data.synthetic.size, 0, 4)  # the smoke image size
    cfg.data.root, cfg.data.synthetic = str(root), None
    classes = build_dataset(cfg.data, "train").num_classes
    overrides = [
        f"data.root={root}",
        "data.synthetic.train_images=16",
        "data.synthetic.val_images=4",
        f"model.num_classes={classes}",
        "solver.checkpoint_every=1",
        "solver.log_every=1",
    ]
    return {"root": root, "overrides": overrides}


def sets(data: dict, *extra: str) -> list[str]:
    return [arg for item in (*data["overrides"], *extra) for arg in ("--set", item)]


def run_argv(results: Path, data: dict, *extra: str) -> list[str]:
    argv = ["run", "--experiment", EXP, "--scale", "smoke", "--seed", "0"]
    return [*argv, "--results", str(results), "--launcher", "inline", *sets(data, *extra)]


def train_argv(run_dir: Path, data: dict, *extra: str) -> list[str]:
    argv = ["train", "--experiment", EXP, "--scale", "smoke", "--seed", "0"]
    return [*argv, "--run-dir", str(run_dir), "--no-progress", *sets(data, *extra)]


def run_dir_of(results: Path) -> Path:
    return results / "runs" / EXP / "seed0"


def checkpoint_iteration(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])


def all_finite(path: Path) -> bool:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return all(
        bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point()
    )


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return {**out, **extra}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------------------
# NaN / inf loss.


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    data, tmp_path, monkeypatch, capsys, bad
):
    """loss_dice becomes NaN (or inf) in iteration 4: one clear line, last.pt = iteration 3
    (finite), no metrics.json, the MLflow run FAILED, and the table cell marked failed."""
    import hcformer.engine.train as train_module

    real = train_module.build_criterion

    def nan_from_iteration_4(cfg):
        criterion = real(cfg)
        forward, calls = criterion.forward, [0]

        def poisoned(*args, **kwargs):
            calls[0] += 1
            out = forward(*args, **kwargs)
            if calls[0] >= 4:
                out["loss_dice"] = out["loss_dice"] * float(bad)
            return out

        criterion.forward = poisoned
        return criterion

    monkeypatch.setattr(train_module, "build_criterion", nan_from_iteration_4)
    results = tmp_path / "results" / "smoke"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = run_argv(results, data, "solver.iterations=8", f"tracking.uri={uri}")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("hcformer run: error:")]
    assert "iteration 4" in line and "loss_dice" in line and bad in line.lower()

    run = run_dir_of(results)
    ckpt = run / "checkpoints"
    assert checkpoint_iteration(ckpt / "last.pt") == 3 and all_finite(ckpt / "last.pt")
    assert checkpoint_iteration(ckpt / "prev.pt") == 2
    assert not (run / "metrics.json").exists() and not (run / "model_final.pt").exists()
    assert json.loads((run / "job.json").read_text())["state"] == "failed"

    from hcformer.tracking.store import client

    (mlrun,) = client(uri).search_runs(
        [e.experiment_id for e in client(uri).search_experiments()],
        filter_string=f"tags.run_dir = '{run.resolve()}'",
    )
    assert mlrun.info.status == "FAILED"

    from hcformer.analysis.aggregate import collect_runs, table_cells
    from hcformer.experiments import load_table

    table = load_table("tableV")
    cells = table_cells(table, collect_runs(results, [EXP], [0]), [0], {})
    (cell,) = [c for c in cells if c["row"] == "HCFormer R50 L3" and c["column"] == "miou"]
    assert cell["status"] == "failed" and cell["ours"] is None


# --------------------------------------------------------------------------------------
# A node dies mid-run; meanwhile the same run is submitted twice.


# Long enough that the killed run is still going after its second checkpoint and the second
# submission, with the CPU fast paths (about 0.1-0.3 s an iteration here).
KILLED_ITERATIONS = 48


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> dict:
    """``hcformer run`` killed with SIGKILL after its second checkpoint (a dead node: its lock
    and job.json stay). While it ran, a second ``hcformer run`` of the same folder was tried."""
    results = tmp_path_factory.mktemp("killed") / "results" / "smoke"
    run = run_dir_of(results)
    argv = run_argv(
        results, data, f"solver.iterations={KILLED_ITERATIONS}", "tracking.enabled=false"
    )
    first = subprocess.Popen(
        [str(BIN / "hcformer"), *argv], env=env(), stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for((run / "checkpoints" / "prev.pt").exists, 300, "the second checkpoint", first)
        with contextlib.redirect_stderr(io.StringIO()) as second_err:
            second_code = cli.main(argv)
        job_after_second = json.loads((run / "job.json").read_text())
        first_alive = first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    snapshot = results.parent / "snapshot"
    shutil.copytree(results, snapshot / "smoke", symlinks=True)
    return {
        "results": results,
        "snapshot": snapshot / "smoke",
        "first_pid": first.pid,
        "first_alive": first_alive,
        "second": (second_code, second_err.getvalue()),
        "job_after_second": job_after_second,
        "argv": argv,
    }


def test_a_second_submission_is_stopped_by_the_lock(killed):
    code, err = killed["second"]
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run folder is locked" in lines[0]
    assert f"pid {killed['first_pid']}" in lines[0]
    assert killed["first_alive"]  # the first was not disturbed...
    assert killed["job_after_second"]["pid"] == killed["first_pid"]  # ...nor its job.json


def test_a_stale_lock_of_a_dead_node_is_taken_over_and_the_run_resumes(killed, tmp_path, capsys):
    results = tmp_path / "smoke"
    shutil.copytree(killed["snapshot"], results, symlinks=True)
    run = run_dir_of(results)
    lock = json.loads((run / ".lock").read_text())
    assert lock["pid"] == killed["first_pid"] and lock["host"] == socket.gethostname()
    resumed_from = checkpoint_iteration(run / "checkpoints" / "last.pt")
    assert resumed_from >= 2

    # `hcformer status` sees the dead run as failed (no live job), not as running.
    assert cli.main(["status", "--results", str(results), "--table", "tableV", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (mine,) = [r for r in report["tables"][0]["runs"] if r["experiment"] == EXP and r["seed"] == 0]
    assert mine["state"] == "failed" and "is gone" in mine["reason"]

    argv = [a if a != str(killed["results"]) else str(results) for a in killed["argv"]]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"took over a stale lock of pid {killed['first_pid']}" in err
    assert f"at iteration {resumed_from}" in err  # resumed, not restarted
    assert json.loads((run / "metrics.json").read_text())
    logged = [json.loads(x)["iteration"] for x in (run / "train_log.jsonl").open()]
    assert logged == list(range(1, KILLED_ITERATIONS + 1))  # each iteration once: the log replays
    assert not (run / ".lock").exists()


# --------------------------------------------------------------------------------------
# A truncated last.pt; a full disk while a checkpoint is written.


def test_a_truncated_last_pt_falls_back_to_the_previous_checkpoint(killed, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir_of(killed["snapshot"]), run, symlinks=True)
    last, prev = run / "checkpoints" / "last.pt", run / "checkpoints" / "prev.pt"
    good = checkpoint_iteration(prev)
    with open(last, "r+b") as fh:  # a node died before the file system synced it
        fh.truncate(last.stat().st_size // 3)
    truncated = last.read_bytes()

    argv = train_argv(
        run, data_of(killed), f"solver.iterations={KILLED_ITERATIONS}", "tracking.enabled=false"
    )
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"{last} unreadable (kept as last.pt.corrupt); resuming from {prev}" in err
    assert f"resumed from {prev} at iteration {good}" in err
    # Nothing lost afterwards: both checkpoints readable, the corrupt file not rotated into prev.
    assert checkpoint_iteration(last) == KILLED_ITERATIONS
    assert checkpoint_iteration(prev) < KILLED_ITERATIONS and all_finite(prev)
    assert (last.parent / "last.pt.corrupt").read_bytes() == truncated  # kept to look at


def data_of(killed: dict) -> dict:
    """The overrides the killed run used (they are part of its config)."""
    argv = killed["argv"]
    items = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    keep = [x for x in items if not x.startswith(("solver.iterations=", "tracking.enabled="))]
    return {"overrides": keep}


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(killed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir_of(killed["snapshot"]), run, symlinks=True)
    ckpt = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt.glob("*.pt")}
    names = sorted(p.name for p in ckpt.iterdir())
    limit = (ckpt / "last.pt").stat().st_size // 2  # the next checkpoint cannot be written

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = train_argv(
        run, data_of(killed), f"solver.iterations={KILLED_ITERATIONS}", "tracking.enabled=false"
    )
    out = subprocess.run(
        [str(BIN / "hcformer"), *argv],
        env=env(),
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("hcformer train: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "last.pt" in errors[0] and "File too large" in errors[0], errors[0]
    # The checkpoints on disk are the ones from before, byte for byte, and no partial file is left.
    assert {p.name: p.read_bytes() for p in ckpt.glob("*.pt")} == before
    assert sorted(p.name for p in ckpt.iterdir()) == names


# --------------------------------------------------------------------------------------
# MLflow unreachable.


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_mlflow_store_warns_and_sync_fills_it_in_later(
    data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HCFORMER_FAULT_SECRET", "s3cr3t-value-9431")  # must never be logged
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    wrong = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    results = tmp_path / "results" / "smoke"
    assert cli.main(run_argv(results, data, "solver.iterations=3", f"tracking.uri={wrong}")) == 0
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if "warning: MLflow store" in x]
    assert warnings and wrong in warnings[0] and "sync-mlflow" in warnings[0]
    run = run_dir_of(results)
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("config.yaml", "run.json", "train_log.jsonl", "checkpoints/last.pt"):
        assert (run / name).is_file(), name

    good = f"sqlite:///{tmp_path / 'later.db'}"
    assert cli.main(["sync-mlflow", "--results", str(results), "--uri", good]) == 0
    from hcformer.tracking.store import client

    mlflow = client(good)
    (mlrun,) = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["run_dir"] == str(run.resolve())
    assert mlrun.data.metrics["miou"] == pytest.approx(metrics["miou"])
    # Safe defaults: the params are the config's keys, and no environment value is among them.
    import yaml

    from hcformer.config import flatten

    config = flatten(yaml.safe_load((run / "config.yaml").read_text()))
    assert set(mlrun.data.params) == set(config)
    values = " ".join(mlrun.data.params.values())
    assert "s3cr3t-value-9431" not in values and os.environ["HOME"] not in values.split()


# --------------------------------------------------------------------------------------
# An unreadable image or label.


@pytest.mark.parametrize("which", ["image", "label"])
def test_an_unreadable_image_or_label_names_the_file(data, tmp_path, capsys, which):
    from hcformer.data import build_dataset
    from hcformer.engine.randomness import dataset_index
    from hcformer.errors import DataError
    from hcformer.experiments import resolve

    root = tmp_path / "ade20k"
    shutil.copytree(data["root"], root)
    cfg = resolve(EXP, "smoke")
    cfg.data.root, cfg.data.synthetic = str(root), None
    ds = build_dataset(cfg.data, "train")
    first = dataset_index(0, 0, len(ds))  # the first sample training draws
    stem = ds.load(first).stem
    (broken,) = [
        p for p in root.rglob(f"{stem}.*") if p.suffix == (".jpg" if which == "image" else ".png")
    ]
    if which == "image":
        with open(broken, "r+b") as fh:
            fh.truncate(broken.stat().st_size // 4)
    else:
        broken.write_bytes(b"not a png at all")

    with pytest.raises(DataError, match=str(broken)):
        ds.load(first)
    run = tmp_path / "run"
    overrides = [x for x in data["overrides"] if not x.startswith("data.root=")]
    argv = train_argv(run, {"overrides": [*overrides, f"data.root={root}"]}, "solver.iterations=2")
    argv += ["--set", "tracking.enabled=false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hcformer train: error:") and str(broken) in err[0]
    assert not (run / "checkpoints" / "last.pt").exists()


# --------------------------------------------------------------------------------------
# Safe defaults (item 4), checked over the project's own source.


def _calls(path: Path):
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name):
                yield owner.id, node.func.attr, node


def _sources() -> list[Path]:
    files = [
        p for d in ("hcformer", "benchmarks", "workflow", "tests") for p in (ROOT / d).rglob("*.py")
    ]
    return [p for p in files if ".venv" not in p.parts]


def test_checkpoints_load_with_weights_only_and_yaml_with_safe_load():
    unsafe = []
    for path in _sources():
        for owner, name, node in _calls(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                if not (value is not None and getattr(value, "value", None) is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                unsafe.append(f"{where}: yaml.{name} (use yaml.safe_load)")
    assert not unsafe, "\n".join(unsafe)


def test_any_mlflow_server_the_project_starts_is_bound_to_localhost():
    """``mlflow server``/``mlflow ui`` bind to 127.0.0.1 by default (``mlflow server --help``);
    no command in the project's code, workflow, CI or docs may name another interface."""
    import re

    dirs = ("hcformer", "workflow", ".ci", "docs")
    texts = [p for d in dirs for p in (ROOT / d).rglob("*") if p.is_file()]
    texts += [ROOT / "README.md", ROOT / "Snakefile"]
    found = []
    for path in texts:
        if not path.exists() or path.suffix in (".png", ".pdf", ".db", ".pt", ".pyc"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"mlflow\s+(server|ui)\b", line):
                found.append(line)
                other = re.search(r"(--host|-h)[ =](?!127\.0\.0\.1\b|localhost\b)\S+", line)
                assert other is None, f"{path}: {line.strip()}"
    assert any("--host 127.0.0.1" in line for line in found)  # docs/campaign.md shows one
