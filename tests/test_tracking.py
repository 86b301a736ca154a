"""MLflow mirror: runs readable back with mlflow.search_runs (names, tags, the experiment kind,
the run's own start and end times), an unreachable store warns and the run goes on, ``hcformer
sync-mlflow`` fills in missing runs idempotently, and live logging to a SQLite or file store on a
network file system is refused (a fake mounts table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from hcformer.commands.sync_mlflow import main as sync_main
from hcformer.config import Config, to_dict
from hcformer.errors import ConfigError
from hcformer.tracking import check_live, ensure_store, method, open_tracker, results_root, store

CONFIG = to_dict(Config())
STARTED = 1_700_000_000.25  # a run's training start (Unix seconds)


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
        "started_at": STARTED,
        "user": "alice",
    }
    (run / "run.json").write_text(json.dumps(info))
    # Training lines at 1, 2, 3 (10 s apart), a validation line at 2 (as hcformer train writes).
    lines = [
        {
            "iteration": i,
            "loss": 10.0 / i,
            "lr": 0.1,
            "time": 10.0 * i,
            "timestamp": STARTED + 10 * i,
        }
        for i in (1, 2, 3)
    ]
    lines.insert(2, {"iteration": 2, "split": "val", "miou": 20.0, "timestamp": STARTED + 25})
    (run / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    os.utime(run / "train_log.jsonl", (STARTED + 30, STARTED + 30))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
        os.utime(run / "metrics.json", (STARTED + 3600, STARTED + 3600))  # evaluation's end
    if failed:
        (run / "job.json").write_text(json.dumps({"state": "failed"}))
        os.utime(run / "job.json", (STARTED + 60, STARTED + 60))
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
    tracker.end(end_time=STARTED + 7200)
    (found,) = search(uri)
    # The dataset is the experiment's name already: the run is named by the model and seed.
    assert found.info.run_name == "hcformer-r50-L3-D8-Q100/seed1"
    assert found.info.status == "FINISHED"
    assert (found.info.start_time, found.info.end_time) == (1_700_000_000_250, 1_700_007_200_250)
    tags = found.data.tags
    assert (tags["exp_id"], tags["seed"], tags["scale"], tags["git_commit"]) == (
        "coco_panoptic/hcformer-r50-L3-D8-Q100",
        "1",
        "smoke",
        "abc",
    )
    assert tags["table.table5"] == "L3" and tags["run_dir"] == str(run.resolve())
    assert tags["method"] == "hcformer"  # Config()'s head: HCFormer without a pixel encoder
    assert tags["mlflow.user"] == "alice" and tags["mlflow.source.git.commit"] == "abc"
    assert tags["mlflow.source.name"] == "hcformer train"
    assert tags["mlflow.note.content"] == "Paper rows: table5: L3"
    assert found.data.params["model.head.queries"] == "100"
    assert found.data.metrics == {"loss": 3.0, "lr": 0.1, "pq": 41.5}
    import mlflow

    exp = mlflow.MlflowClient(uri).get_experiment(found.info.experiment_id)
    assert exp.name == "hcformer/smoke/coco_panoptic"
    # MLflow 3's UI opens an experiment of this kind on its runs (not on the GenAI views).
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
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
    assert set(runs) == {"a/seed0", "a/seed1", "b/seed0"}
    assert runs["a/seed1"].info.status == "FINISHED"
    assert runs["a/seed1"].data.metrics["miou"] == 63.0
    assert runs["b/seed0"].info.status == "FAILED"
    # The run's own times (run.json's start, metrics.json written at the evaluation's end; a
    # failed run ends at its last file), not the sync's.
    assert runs["a/seed1"].info.start_time == 1_700_000_000_250
    assert runs["a/seed1"].info.end_time == 1_700_003_600_250
    assert runs["b/seed0"].info.end_time == 1_700_000_060_250
    tags = runs["a/seed1"].data.tags
    assert tags["mlflow.user"] == "alice" and tags["method"] == "hcformer"
    import mlflow

    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(runs["a/seed0"].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert [m.timestamp for m in history] == [
        1_700_000_010_250,
        1_700_000_020_250,
        1_700_000_030_250,
    ]
    # The validation curve: the line at 2, then metrics.json's score at the last iteration.
    miou = client.get_metric_history(runs["a/seed0"].info.run_id, "miou")
    assert [(m.step, m.value, m.timestamp) for m in miou] == [
        (2, 20.0, 1_700_000_025_250),
        (3, 61.0, 1_700_003_600_250),
    ]
    assert "timestamp" not in runs["a/seed0"].data.metrics
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


def test_start_time_of_an_older_folder_comes_from_its_training_log(tmp_path):
    from hcformer.tracking.sync import run_info, start_time

    run = make_run_folder(tmp_path / "results", "ade20k/a", 0, metrics={"miou": 1.0})
    info = run_info(run)
    del info["started_at"]
    # First line: stamped STARTED + 10 after 10 training seconds.
    assert start_time(run, info) == pytest.approx(STARTED)
    (run / "train_log.jsonl").unlink()
    os.utime(run / "config.yaml", (STARTED - 5, STARTED - 5))
    assert start_time(run, info) == STARTED - 5


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("ade20k/hcformer-r50-L3-D8-Q100", "hcformer"),
        ("ade20k/hcformer-r50-L3-D8-Q100-plus", "hcformer+"),
        ("coco_panoptic/maskformer-r50-D6-Q100-plus", "maskformer+"),
        ("ade20k/pspnet-r101-os8", "pspnet"),
        ("ade20k/pspnet-r101-L3", "hc-pspnet"),
        ("ade20k/deeplabv3-r101-L3", "hc-deeplabv3"),
        ("cityscapes/fcn32s-r101-L0", "fcn32s"),
        ("cityscapes/fpn-r101-L0", "fpn"),
    ],
)
def test_method_tag_names_the_model_family(experiment, expected):
    from hcformer.experiments import get_experiment

    assert method(to_dict(get_experiment(experiment, "paper").config)) == expected


# A compute node's mounts: the root on local disk, home over NFS, scratch on Lustre, a share with
# a space in its name over CIFS (written as \040), a local disk under the NFS home.
MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/home /home nfs4 rw,vers=4.2 0 0
10.0.0.1@o2ib:/scratch /lustre/scratch lustre rw,flock 0 0
//nas/lab\\040data /mnt/lab\\040data cifs rw 0 0
/dev/nvme0n1 /home/alice/local xfs rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path) -> Path:
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return path


@pytest.mark.parametrize(
    ("uri", "refused"),
    [
        ("sqlite:////home/alice/results/paper/mlflow.db", "nfs4 mounted at /home"),
        ("sqlite:////lustre/scratch/results/mlflow.db", "lustre mounted at /lustre/scratch"),
        ("file:///mnt/lab data/mlruns", "cifs mounted at /mnt/lab data"),
        ("/home/alice/mlruns", "nfs4 mounted at /home"),
        ("sqlite:////home/alice/local/mlflow.db", None),  # a local disk inside the NFS home
        ("sqlite:////tmp/mlflow.db", None),
        ("sqlite:////var/results/mlflow.db", None),  # under / (ext4)
        ("http://mlflow.example:5000", None),
        ("https://mlflow.example", None),
        ("databricks", None),
    ],
)
def test_live_logging_to_a_store_on_a_network_file_system_is_refused(uri, refused, mounts):
    if refused is None:
        store.check_live_store(uri, mounts)
        return
    with pytest.raises(ConfigError) as err:
        store.check_live_store(uri, mounts)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"tracking.uri {uri}: ")
    assert f"network file system ({refused})" in message
    assert "MLFLOW_TRACKING_URI=http" in message and "hcformer sync-mlflow" in message


def test_an_unreadable_mounts_table_refuses_nothing(tmp_path):
    store.check_live_store("sqlite:////home/x/mlflow.db", tmp_path / "no-such-file")


def test_hcformer_train_refuses_live_logging_to_nfs_before_loading_anything(
    tmp_path, monkeypatch, capsys
):
    """One line, exit 2, before the run folder is written, the data read or the model built;
    nothing is refused with tracking off."""
    from hcformer import cli

    (tmp_path / "mounts").write_text(f"/dev/sda1 / ext4 rw 0 0\nsrv:/x {tmp_path} nfs rw 0 0\n")
    monkeypatch.setattr(store, "MOUNTS", tmp_path / "mounts")
    run = tmp_path / "results" / "paper" / "runs" / "ade20k" / "x" / "seed0"
    argv = ["train", "--experiment", "ade20k/hcformer-r50-L3-D8-Q100", "--scale", "smoke"]
    argv += ["--run-dir", str(run), "--set", f"data.root={tmp_path / 'nowhere'}"]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    db = (tmp_path / "results" / "paper" / "mlflow.db").resolve()
    assert line.startswith(f"hcformer train: error: tracking.uri sqlite:///{db}: ")
    assert f"(nfs mounted at {tmp_path})" in line
    assert not run.exists()  # nothing written
    # With tracking off (the workflow's mlflow_live: false) nothing is refused.
    check_live(run, {"tracking": {"enabled": False}}, {"scale": "paper"})
    with pytest.raises(ConfigError):
        check_live(run, {"tracking": {"enabled": True}}, {"scale": "paper"})
