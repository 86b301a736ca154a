"""A long run is visible: validation every ``solver.eval_every`` iterations lands in
``train_log.jsonl`` and MLflow at its iteration (a resumed run neither repeats nor loses one, and
the final ``metrics.json`` is ``hcformer evaluate``'s alone), and the job's log shows a progress
line per logged iteration. Smoke-scale HCFormer on 12 synthetic ADE20K-format images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hcformer.engine import evaluate as evaluate_module
from hcformer.engine import signals
from hcformer.engine.evaluate import evaluate
from hcformer.engine.train import Progress, duration, train
from hcformer.launch.create import create_run, resolve_run

torch.set_num_threads(1)

EXPERIMENT = "ade20k/hcformer-r50-L3-D8-Q100"
ITERATIONS = 6


def overrides(data: Path, uri: str = "") -> list[str]:
    return [
        f"data.root={data}",
        "data.synthetic.train_images=12",
        "data.synthetic.val_images=4",
        f"solver.iterations={ITERATIONS}",
        "solver.eval_every=2",
        "solver.log_every=1",
        "solver.batch_size=2",
        "solver.checkpoint_every=2",
        f"tracking.uri={uri}" if uri else "tracking.enabled=false",
    ]


def make_run(run: Path, data: Path, uri: str = "", *extra: str) -> Path:
    """The run folder of the smoke experiment on ``data`` (``extra``: more overrides)."""
    sets = [*overrides(data, uri), *extra]
    return create_run(run, experiment=EXPERIMENT, scale="smoke", seed=0, overrides=sets)


def log_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def validations(run: Path) -> list[tuple[int, float]]:
    return [(e["iteration"], e["miou"]) for e in log_lines(run) if e.get("split") == "val"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "ade20k"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run with live MLflow logging, then its evaluation."""
    work = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    run = make_run(work / "run", data, uri)
    result = train(run)
    assert result.finished
    return run, uri


def test_validation_every_n_iterations_is_logged_and_leaves_the_final_evaluation_alone(
    reference,
):
    run, uri = reference
    lines = log_lines(run)
    assert [e["iteration"] for e in lines if "loss" in e] == list(range(1, ITERATIONS + 1))
    val = [e for e in lines if e.get("split") == "val"]
    # At 2 and 4, not at 6: the last iteration is hcformer evaluate's.
    assert [e["iteration"] for e in val] == [2, 4]
    for e in val:
        assert 0.0 <= e["miou"] <= 100.0 and 0.0 <= e["pixel_acc"] <= 100.0
        assert e["eval_seconds"] > 0 and e["timestamp"] > 1.6e9
        assert "useg_level3" in e and "iterations" not in e and "images" not in e
    # Each validation line follows its iteration's training line.
    order = [(e["iteration"], e.get("split", "train")) for e in lines]
    assert order.index((2, "val")) == order.index((2, "train")) + 1
    # Nothing of the final evaluation's is written by training, and no temporary folder is left.
    assert not (run / "metrics.json").exists() and not (run / "predictions").exists()
    assert not list(run.glob(".validation-*"))
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == ITERATIONS and state["validated"] == 4

    metrics = evaluate(run)
    assert metrics["iterations"] == ITERATIONS
    assert json.loads((run / "metrics.json").read_text())["miou"] == metrics["miou"]
    # MLflow: each score's history is the validation curve ending at the final evaluation.
    from hcformer.tracking.store import client

    mlflow = client(uri)
    (mlrun,) = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    history = mlflow.get_metric_history(mlrun.info.run_id, "miou")
    assert [(m.step, m.value) for m in history] == [
        (2, pytest.approx(val[0]["miou"])),
        (4, pytest.approx(val[1]["miou"])),
        (ITERATIONS, pytest.approx(metrics["miou"])),
    ]
    assert mlrun.data.metrics["miou"] == pytest.approx(metrics["miou"])
    assert [m.step for m in mlflow.get_metric_history(mlrun.info.run_id, "loss")] == list(
        range(1, ITERATIONS + 1)
    )


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_run_stopped_at_a_validation_resumes_without_repeating_or_losing_it(
    when, data, reference, tmp_path, monkeypatch
):
    """Stopped during the validation at 4 (the stop request cuts it short): the resumed run
    validates 4 first. Stopped right after it: the checkpoint at 4 keeps its line and the
    resumed run does not validate 4 again. Either way the log equals the uninterrupted run's."""
    run = make_run(tmp_path / "run", data)
    original = evaluate_module.Evaluator.run
    calls = []
    armed = [True]  # the first run only

    def stop_at_4(self, model=None, **kw):
        calls.append(self.iterations)
        stop = self.iterations == 4 and armed[0]
        if stop and when == "during":
            signals.request_stop()
        out = original(self, model, **kw)
        if stop and when == "after":
            signals.request_stop()
        return out

    monkeypatch.setattr(evaluate_module.Evaluator, "run", stop_at_4)
    first = train(run)
    assert first.stopped and first.iteration == 4 and first.exit_code == signals.EXIT_STOPPED
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 4
    assert state["validated"] == (2 if when == "during" else 4)
    assert [i for i, _ in validations(run)] == ([2] if when == "during" else [2, 4])

    calls.clear()
    armed[0] = False
    second = train(run)
    assert second.finished
    assert calls == ([4] if when == "during" else [])
    ref_run, _ = reference
    assert validations(run) == validations(ref_run)  # same iterations, same scores
    got = [(e["iteration"], e["loss"]) for e in log_lines(run) if "loss" in e]
    ref = [(e["iteration"], e["loss"]) for e in log_lines(ref_run) if "loss" in e]
    assert got == ref


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_run_killed_after_a_validation_but_before_its_checkpoint_validates_again(
    data, reference, tmp_path, monkeypatch
):
    """Killed between the validation at 4 and the checkpoint at 4: the run resumes from the
    checkpoint at 2, whose log replay drops the validation line at 4, and validates 4 again."""
    from hcformer.engine.train import Trainer

    run = make_run(tmp_path / "run", data)
    save = Trainer.save

    def killed_at_4(self):
        if self.iteration == 4:
            raise Killed
        return save(self)

    monkeypatch.setattr(Trainer, "save", killed_at_4)
    with pytest.raises(Killed):
        train(run)
    assert [i for i, _ in validations(run)] == [2, 4]  # logged before the kill
    monkeypatch.setattr(Trainer, "save", save)
    assert train(run).finished
    ref_run, _ = reference
    assert validations(run) == validations(ref_run)


def test_progress_lines_show_speed_eta_and_memory(capsys):
    bar = Progress(100, 0, enabled=True, batch_size=8, device=torch.device("cpu"), eval_every=40)
    bar.update(10, {"loss": 2.5, "lr": 1e-4, "time": 5.0})
    bar.validation(40, {"miou": 12.345, "useg_level1": 3.0, "eval_seconds": 30.0})
    bar.update(20, {"loss": 2.25, "lr": 1e-4, "time": 7.0})
    lines = capsys.readouterr().err.splitlines()
    first, val, second = lines
    assert first.startswith("hcformer train: it 10/100 (10.0%) | loss 2.5000 | lr 0.0001")
    assert "s/it" not in first  # no speed before a second line
    assert re.search(r"peak RSS \d+\.\d\d GiB", first)
    assert val == "hcformer train: validation at it 40: miou 12.35 (30 s)"
    # 2 s over 10 iterations: 0.2 s/it, 8 / 0.2 = 40 images/s; ETA: 80 iterations left at 0.2 s
    # plus the validations at 40 and 80 (not 100, the final evaluation's) at 30 s: 76 s.
    assert "| 0.200 s/it | 40.0 img/s | ETA 1m16s |" in second
    assert duration(2 * 86400 + 3 * 3600 + 4 * 60) == "2d03h04m"
    assert duration(3600 + 59) == "1h00m" and duration(59.4) == "59s"


def test_negative_eval_every_is_refused(data, tmp_path):
    from hcformer.errors import ConfigError

    run = make_run(tmp_path / "run", data, "", "solver.eval_every=-5")
    with pytest.raises(ConfigError, match=r"solver\.eval_every: -5"):
        train(run)


@pytest.mark.slow
def test_two_process_ddp_validates_on_the_main_process_while_the_other_waits(
    data, reference, tmp_path
):
    """gloo DDP, 2 processes: both finish (the waiting one in a barrier, not in a collective
    that would time out), and the validations are logged once each."""
    import os
    import subprocess
    import sys

    import yaml

    from hcformer.config import to_dict

    cfg, _ = resolve_run(  # data written by the reference run
        experiment=EXPERIMENT, config_file=None, scale="smoke", seed=0, overrides=overrides(data)
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    run = tmp_path / "run"
    common = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29600 + os.getpid() % 1000),
    }
    cmd = [sys.executable, "-m", "hcformer.cli", "train", "--config", str(path)]
    cmd += ["--seed", "0", "--run-dir", str(run), "--no-progress"]
    procs = [
        subprocess.Popen(
            cmd,
            env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [i for i, _ in validations(run)] == [2, 4]
    ref_run, _ = reference
    # The same weights up to float summation order: the same scores within a little.
    for (_, got), (_, ref) in zip(validations(run), validations(ref_run)):
        assert got == pytest.approx(ref, abs=2.0)
