"""MLflow under the pipeline's concurrency: 8 jobs that finish at once leave 8 runs.

The workflow creates the store once (rule ``mlflow_store``) before runs start; then 8 processes
each write their finished run at the same moment (as 8 run jobs ending together do), and the
serial fill-in step (``hcformer sync-mlflow`` over the results tree) adds nothing twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "mlflow_store.py"


def _run_folder(results: Path, k: int) -> Path:
    exp = f"ade20k/hcformer-r50-L{k % 4}-D8-Q100"
    run = results / "runs" / exp / f"seed{k // 4}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "ade20k"}, "seed": k}))
    info = {
        "exp_id": exp,
        "seed": k // 4,
        "scale": "smoke",
        "git_commit": "abc",
        "tables": {"tableV": "x"},
    }
    (run / "run.json").write_text(json.dumps(info))
    (run / "train_log.jsonl").write_text(json.dumps({"iteration": 1, "loss": 2.0}) + "\n")
    (run / "metrics.json").write_text(json.dumps({"miou": 10.0 + k, "iterations": 1}))
    return run


@pytest.mark.slow
def test_eight_jobs_finishing_at_once_leave_eight_runs(tmp_path):
    results = tmp_path / "smoke"
    runs = [_run_folder(results, k) for k in range(8)]
    uri = f"sqlite:///{results / 'mlflow.db'}"  # the workflow's layout: artefacts beside it
    made = subprocess.run(
        [sys.executable, str(SCRIPT), "--uri", uri], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    # The 8 jobs end together: each writes its own run folder's MLflow run.
    cmd = [sys.executable, "-m", "hcformer.cli", "sync-mlflow", "--uri", uri, "--results"]
    procs = [subprocess.Popen([*cmd, str(run)], stderr=subprocess.PIPE, text=True) for run in runs]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    # The serial step afterwards (as rule sync_mlflow: over runs/) finds nothing missing.
    serial = subprocess.run(
        [*cmd, str(results / "runs")], capture_output=True, text=True, timeout=300
    )
    assert serial.returncode == 0 and "8 present" in serial.stderr, serial.stderr

    from hcformer.tracking.store import client

    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name("hcformer/smoke/ade20k")
    found = mlflow.search_runs([exp.experiment_id], max_results=100)
    assert len(found) == 8
    assert {r.data.tags["run_dir"] for r in found} == {str(r.resolve()) for r in runs}
    assert {r.info.status for r in found} == {"FINISHED"}
    assert sorted(r.data.metrics["miou"] for r in found) == [10.0 + k for k in range(8)]
    assert {r.data.tags["table.tableV"] for r in found} == {"x"}
