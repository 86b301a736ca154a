"""MLflow mirror: runs readable back with mlflow.search_runs, an unreachable store warns and the
run goes on, ``hcformer sync-mlflow`` fills in missing runs idempotently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hcformer.config import Config, to_dict
from hcformer.tracking import ensure_store, open_tracker, results_root
from hcformer.tracking.sync import main as sync_main

CONFIG = to_dict(Config())


def make_run_folder(root: Path, exp: str, seed: int, *, metrics: dict | None, failed=False) -> Path:
    run = root / "smoke" / "runs" / exp / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = dict(CONFIG, tracking={"uri": "", "enabled": True})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    info = {
        "exp_id": exp,
        "seed": seed,
        "scale": "smoke",
        "git_commit": "abc",
        "tables": {"table5": "L3"},
    }
    (run / "run.json").write_text(json.dumps(info))
    (run / "train_log.jsonl").write_text(
        "".join(json.dumps({"iteration": i, "loss": 10.0 / i, "lr": 0.1}) + "\n" for i in (1, 2, 3))
    )
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (run / "job.json").write_text(json.dumps({"state": "failed"}))
    return run


def search(uri: str):
    """All runs of a store (``MlflowClient.search_runs``; ``mlflow.set_tracking_uri`` would leak
    into the environment of later tests)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_live_run_is_readable_back(tmp_path):
    root = tmp_path / "results"
    run = make_run_folder(root, "coco_panoptic/hcformer-r50-L3-D8-Q100", 1, metrics=None)
    assert results_root(run, "smoke") == (root / "smoke").resolve()
    uri = f"sqlite:///{root / 'smoke' / 'mlflow.db'}"
    ensure_store(uri)
    info = json.loads((run / "run.json").read_text())
    tracker = open_tracker(run, dict(CONFIG), info)  # default store: <results>/<scale>/mlflow.db
    assert tracker.uri == uri and tracker.run_id
    tracker.log_metrics({"loss": 3.0, "lr": 0.1}, step=5)
    (run / "metrics.json").write_text(json.dumps({"pq": 41.5}))
    tracker.log_metrics({"pq": 41.5}, step=6)
    tracker.log_artifacts([run / "config.yaml", run / "metrics.json"])
    tracker.end()
    (found,) = search(uri)
    assert found.info.run_name == "coco_panoptic/hcformer-r50-L3-D8-Q100/seed1"
    assert found.info.status == "FINISHED"
    tags = found.data.tags
    assert (tags["exp_id"], tags["seed"], tags["scale"], tags["git_commit"]) == (
        "coco_panoptic/hcformer-r50-L3-D8-Q100",
        "1",
        "smoke",
        "abc",
    )
    assert tags["table.table5"] == "L3" and tags["run_dir"] == str(run.resolve())
    assert found.data.params["model.head.queries"] == "100"
    assert found.data.metrics == {"loss": 3.0, "lr": 0.1, "pq": 41.5}
    import mlflow

    exp = mlflow.MlflowClient(uri).get_experiment(found.info.experiment_id)
    assert exp.name == "hcformer/smoke/coco_panoptic"
    artefacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(found.info.run_id)}
    assert artefacts == {"config.yaml", "metrics.json"}
    # No environment variables or credentials among the params.
    assert all(k.split(".")[0] in CONFIG for k in found.data.params)
    # Re-opening (a resumed run) attaches to the same MLflow run.
    again = open_tracker(run, dict(CONFIG), info)
    assert again.run_id == found.info.run_id


def test_unreachable_store_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = make_run_folder(tmp_path / "results", "ade20k/x", 0, metrics=None)
    cfg = dict(CONFIG, tracking={"uri": "http://127.0.0.1:9", "enabled": True})
    tracker = open_tracker(run, cfg, {"exp_id": "ade20k/x", "seed": 0, "scale": "smoke"})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    err = capsys.readouterr().err
    assert err.count("warning: MLflow store http://127.0.0.1:9 unavailable") == 1
    assert "the run goes on" in err and not tracker.enabled


def test_sync_fills_missing_runs_idempotently(tmp_path, capsys):
    root = tmp_path / "results"
    make_run_folder(root, "ade20k/a", 0, metrics={"miou": 61.0, "iterations": 3})
    make_run_folder(root, "ade20k/a", 1, metrics={"miou": 63.0, "iterations": 3})
    make_run_folder(root, "ade20k/b", 0, metrics=None, failed=True)
    make_run_folder(root, "ade20k/c", 0, metrics=None)  # still running: left alone
    assert sync_main(["--results", str(root)]) == 0
    assert "2 created, 1 failed, 1 skipped" in capsys.readouterr().err
    uri = f"sqlite:///{root / 'smoke' / 'mlflow.db'}"
    runs = {r.info.run_name: r for r in search(uri)}
    assert set(runs) == {"ade20k/a/seed0", "ade20k/a/seed1", "ade20k/b/seed0"}
    assert runs["ade20k/a/seed1"].info.status == "FINISHED"
    assert runs["ade20k/a/seed1"].data.metrics["miou"] == 63.0
    assert runs["ade20k/b/seed0"].info.status == "FAILED"
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(
        runs["ade20k/a/seed0"].info.run_id, "loss"
    )
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert sync_main(["--results", str(root)]) == 0  # idempotent
    assert "3 present, 1 skipped" in capsys.readouterr().err
    assert len(search(uri)) == 3


def test_sync_rejects_missing_folder(tmp_path):
    from hcformer.errors import HCFormerError

    with pytest.raises(HCFormerError, match="no such folder"):
        sync_main(["--results", str(tmp_path / "nope")])


def test_run_folders_skip_checkpoints_and_mlflow_artefact_copies(tmp_path):
    """sync must not turn MLflow's artefact copies of config.yaml into runs of their own."""
    from hcformer.tracking.sync import run_folders

    run = tmp_path / "runs" / "ade20k" / "hcformer-r50-L3-D8-Q100" / "seed0"
    copies = [
        run / "checkpoints",
        tmp_path / "mlartifacts" / "1" / "abc" / "artifacts",
        tmp_path / "mlruns" / "1" / "abc" / "artifacts",
    ]
    for folder in [run, *copies]:
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("{}\n")
    assert list(run_folders(tmp_path)) == [run]
