"""Creating a run resolves its config once (hcformer.launch.create): the folder then holds
everything the engine reads, and the engine never imports the paper's tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hcformer import cli
from hcformer.config import to_dict
from hcformer.errors import ConfigError
from hcformer.experiments import resolve
from hcformer.launch.create import create_run

ROOT = Path(__file__).resolve().parents[1]
EXP = "coco_panoptic/hcformer-r50-L3-D8-Q100"
OFF = "tracking.enabled=false"


def test_a_created_run_holds_the_resolved_config_and_who_it_is(tmp_path):
    run = create_run(tmp_path / "run", experiment=EXP, scale="smoke", seed=2, overrides=[OFF])
    expected = to_dict(resolve(EXP, "smoke"))
    expected["tracking"]["enabled"] = False
    assert yaml.safe_load((run / "config.yaml").read_text()) == expected
    info = json.loads((run / "run.json").read_text())
    assert (info["exp_id"], info["seed"], info["scale"]) == (EXP, 2, "smoke")
    assert info["dataset"] == "coco_panoptic" and info["overrides"] == [OFF]
    assert info["tables"]["table5"] == "HCFormer R50 L3"  # a paper row it feeds
    assert "started_at" not in info  # the first start of training adds it


def test_creating_again_keeps_the_folder_or_names_the_keys_that_differ(tmp_path):
    run = create_run(tmp_path / "run", experiment=EXP, scale="smoke", seed=0, overrides=[OFF])
    before = {p.name: p.read_text() for p in run.iterdir()}
    create_run(run, experiment=EXP, scale="smoke", seed=0, overrides=[OFF])
    assert {p.name: p.read_text() for p in run.iterdir()} == before
    again = [OFF, "solver.iterations=7"]
    with pytest.raises(ConfigError) as err:
        create_run(run, experiment=EXP, scale="smoke", seed=0, overrides=again)
    assert str(err.value) == (
        f"{run / 'config.yaml'}: this run folder was started with another config "
        "(solver.iterations: 6 -> 7); use a new --run-dir or remove the folder"
    )
    assert {p.name: p.read_text() for p in run.iterdir()} == before


def test_hcformer_train_on_a_folder_of_another_config_is_one_line_exit_2(tmp_path, capsys):
    run = create_run(tmp_path / "run", experiment=EXP, scale="smoke", seed=0, overrides=[OFF])
    argv = ["train", "--experiment", EXP, "--scale", "smoke", "--run-dir", str(run)]
    assert cli.main([*argv, "--set", OFF, "--set", "solver.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"hcformer train: error: {run / 'config.yaml'}: this run folder")
    assert "solver.lr: 0.001 -> 0.5" in err


def test_neither_an_experiment_nor_a_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="give --experiment ID or --config FILE"):
        create_run(tmp_path / "run", scale="smoke", seed=0)


def test_the_engine_imports_no_paper_tables():
    code = (
        "import sys\n"
        "import hcformer.engine.train, hcformer.engine.evaluate\n"
        "print('hcformer.experiments' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
