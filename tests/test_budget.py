"""``hcformer budget`` (docs/campaign.md): GPU-hours from the paper's schedules and the figures.

Expected numbers are computed here by hand from the paper's schedules (App. D: 368,750 COCO
iterations at batch 16 on 1024x1024 crops, 160k ADE20K iterations on 512x512 crops; MaskFormer's
published schedule at batch 64) and the figures file, not read back from the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hcformer import cli
from hcformer.analysis import budget
from hcformer.experiments import experiments_dir, load_table

FIGURES = yaml.safe_load((experiments_dir() / "gpu_seconds_per_iter.yaml").read_text())
R50 = FIGURES["figures"]["resnet50"]["gpu_seconds_per_iter"]
FIXED = FIGURES["fixed_fraction"]


def _budget(tmp_path, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "budget.json"
    code = cli.main(["budget", *argv, "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text()), ""


def test_figures_file_says_what_is_measured_and_how():
    """Measured figures carry device, date and command; estimates say how they were derived."""
    figures = FIGURES["figures"]
    for family, figure in figures.items():
        assert figure["source"], family
        assert figure["gpu_seconds_per_iter"] > 0
        if figure.get("measured"):
            assert figure["date"] and "hcformer benchmark-train" in figure["command"], family
        else:
            assert figure["source"].startswith("estimate"), family
    measured = {f for f, figure in figures.items() if figure.get("measured")}
    assert measured == {"resnet50", "resnet50/maskformer", "swin_l", "resnet101/os8"}
    assert FIGURES["device"] == "NVIDIA H200"
    # The fixed share reproduces the two measured R50 crops: 16 x 1024^2 and 16 x 512^2 (0.192 s).
    assert pytest.approx(0.192, rel=0.01) == R50 * (FIXED + (1 - FIXED) / 4)


def test_table5_gpu_hours_by_hand(tmp_path, capsys):
    report, _ = _budget(tmp_path, "--table", "table5")
    per_run = 368750 * R50 / 3600  # every table-5 row is an R50 COCO model at batch 16, 1024^2
    assert len(report["experiments"]) == 4
    for line in report["experiments"]:
        assert line["iterations"] == 368750 and line["batch_size"] == 16
        assert line["gpu_hours"] == pytest.approx(per_run)
        assert line["wall_hours"] == pytest.approx(per_run / line["gpus"])
        assert line["gpu_hours_all_seeds"] == pytest.approx(3 * per_run)
    assert report["total"]["gpu_hours"] == pytest.approx(4 * 3 * per_run)
    assert report["measured"] is True and report["note"] == "all figures measured"
    text = capsys.readouterr().out
    assert "0.38 at batch 16, 1024x1024 [measured: NVIDIA H200, 2026-12-04]" in text
    assert "command: hcformer benchmark-train --experiment coco_panoptic/hcformer-r50" in text


def test_all_tables_total_counts_shared_experiments_once(tmp_path, capsys):
    report, _ = _budget(tmp_path, "--table", "all")
    by_id = {line["experiment"]: line for line in report["experiments"]}
    assert report["total"]["gpu_hours"] == pytest.approx(
        sum(line["gpu_hours_all_seeds"] for line in by_id.values())
    )
    assert report["total"]["runs"] == 3 * len(by_id)
    # Shared experiments make the tables' sum larger than the campaign.
    assert sum(t["gpu_hours"] for t in report["tables"]) > report["total"]["gpu_hours"]
    # A crop of a quarter of the pixels (ADE20K 512^2) costs the fixed share plus a quarter.
    ade = by_id["ade20k/hcformer-r50-L3-D8-Q100"]
    assert ade["crop"] == [512, 512] and ade["iterations"] == 160000
    assert ade["gpu_hours"] == pytest.approx(160000 * R50 * (FIXED + (1 - FIXED) / 4) / 3600)
    # MaskFormer's published schedule: batch 64, measured at 64: the figure as it is.
    (maskformer,) = [line for line in by_id.values() if line["family"] == "resnet50/maskformer"]
    figure = FIGURES["figures"]["resnet50/maskformer"]["gpu_seconds_per_iter"]
    assert maskformer["batch_size"] == 64
    assert maskformer["gpu_seconds_per_iter"] == pytest.approx(figure)
    # HCFormer Swin-L measured at 8 images: the paper's 16 cost twice the figure.
    swinl = by_id["coco_panoptic/hcformer-swinl-L3-D8-Q200"]
    assert swinl["batch_size"] == 16
    assert swinl["gpu_seconds_per_iter"] == pytest.approx(2 * 0.492)
    text = capsys.readouterr().out
    assert "campaign" in text and f"{report['total']['gpu_hours']:,.0f}" in text


def test_a_measured_benchmark_replaces_the_estimate(tmp_path):
    """The JSON of ``hcformer benchmark-train`` (its keys: exp_id, scale, device, batch,
    input_size, seconds_per_iteration), measured at half the paper's batch on one GPU."""
    bench = tmp_path / "r50.json"
    measured = {
        "exp_id": "coco_panoptic/hcformer-r50-L3-D8-Q100",
        "scale": "paper",
        "device": "NVIDIA H200",
        "amp": True,
        "batch": 8,
        "input_size": [1024, 1024],
        "seconds_per_iteration": 0.5,
        "images_per_second": 16.0,
    }
    bench.write_text(json.dumps(measured))
    report, _ = _budget(tmp_path, "--table", "table5", "--gpu-seconds-per-iter", str(bench))
    (figure,) = report["figures"].values()
    assert figure["measured"] and figure["device"] == "NVIDIA H200" and figure["batch_size"] == 8
    assert report["measured"] is True and report["note"] == "all figures measured"
    # 0.5 s for 8 images -> 1.0 s for the paper's 16; table 5 = 4 experiments x 3 seeds.
    assert report["experiments"][0]["gpu_seconds_per_iter"] == pytest.approx(1.0)
    assert report["total"]["gpu_hours"] == pytest.approx(4 * 3 * 368750 * 1.0 / 3600)
    # Several GPUs sharing the batch: GPU-seconds = seconds x GPUs.
    bench.write_text(json.dumps({**measured, "gpus": 2}))
    report, _ = _budget(tmp_path, "--table", "table5", "--gpu-seconds-per-iter", str(bench))
    assert report["experiments"][0]["gpu_seconds_per_iter"] == pytest.approx(2.0)
    # Only the measured family changes: Swin-S of table 1 stays an estimate.
    report, _ = _budget(tmp_path, "--table", "table1", "--gpu-seconds-per-iter", str(bench))
    assert report["figures"]["resnet50"]["device"] == "NVIDIA H200"
    assert report["figures"]["resnet50"]["gpu_seconds_per_iter"] == pytest.approx(1.0)
    assert not report["figures"]["swin_s"]["measured"]
    assert report["measured"] is False and report["note"].startswith("ESTIMATES")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("figures: {resnet50: {gpu_seconds_per_iter: -1, batch_size: 16, crop: [8, 8]}}",
         "figures.resnet50.gpu_seconds_per_iter: expected a positive number, got -1"),
        ("figures: {resnet50: {gpu_seconds_per_iter: 1, batch_size: 16}}",
         "figures.resnet50: missing key 'crop'"),
        ("figures: {resnet50: {gpu_secs: 1, batch_size: 16, crop: [8, 8]}}",
         "unknown keys ['gpu_secs']"),
        ("just: words", "neither a figures file"),
        ('{"seconds_per_iteration": 1, "scale": "tiny", "exp_id": "x"}',
         "measured at scale 'tiny'"),
    ],
)  # fmt: skip
def test_bad_figures_files_fail_with_one_clear_line(tmp_path, content, message):
    path = tmp_path / "figures.yaml"
    path.write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "hcformer.cli", "budget", "--gpu-seconds-per-iter", str(path),
         "--out", str(tmp_path / "b.json")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and str(path) in out.stderr


def test_a_family_without_a_figure_is_named(tmp_path):
    path = tmp_path / "only_r50.yaml"
    path.write_text("figures: {resnet50: {gpu_seconds_per_iter: 1, batch_size: 16, crop: [8, 8]}}")
    figures, _ = budget.load_figures(path)
    exp = load_table("table1")
    from hcformer.experiments import all_experiments

    swin_l = next(
        all_experiments("paper")[i] for row in exp.rows for i in row.experiment_ids if "swinl" in i
    )
    with pytest.raises(budget.ConfigError, match="swin_l/hcformer or swin_l"):
        budget.figure_for(swin_l.config, figures)


def test_budget_imports_no_torch(tmp_path):
    code = (
        "import sys\nfrom hcformer.cli import main\n"
        f"main(['budget', '--out', {str(tmp_path / 'b.json')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert Path(tmp_path / "b.json").is_file()
