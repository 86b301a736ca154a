"""COCO mask AP against the official pycocotools printout, and boundary AP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hcformer.commands.evaluate_instance import main
from hcformer.errors import DataError
from hcformer.evaluation import evaluate_instance
from hcformer.evaluation.instance import STAT_NAMES

FIX = Path(__file__).parent / "fixtures" / "coco_instances_val2014"
GT = FIX / "instances_val2014_100.json"
RESULTS = FIX / "instances_val2014_fakesegm100_results.json"

# Measured with faster-coco-eval 1.8.0 on this sample (notes/metrics.md: the same numbers as the
# official boundary-iou-api to 6 decimals); percent.
BOUNDARY = {
    "ap_boundary": 22.6394,
    "ap50_boundary": 37.7501,
    "ap75_boundary": 22.5580,
    "ap_s_boundary": 38.7374,
    "ap_m_boundary": 27.2367,
    "ap_l_boundary": 7.5544,
}


def official_segm() -> list[float]:
    text = (FIX / "val2014_fake_eval_res.txt").read_text()
    block = text.split("type=segm")[1].split("type=bbox")[0]
    return [float(v) for v in re.findall(r"\] = ([0-9.]+)", block)]


@pytest.fixture(scope="module")
def scores():
    return evaluate_instance(GT, RESULTS, boundary=True)


def test_reproduces_the_official_printout(scores):
    official = official_segm()
    assert len(official) == 12
    for name, want in zip(STAT_NAMES, official):
        assert round(scores[name] / 100, 3) == pytest.approx(want, abs=1e-9), name
    assert round(scores["ap"], 2) == 31.95 and round(scores["ap50"], 2) == 56.23
    assert scores["images"] == 100 and scores["detections"] == 734


def test_boundary_ap(scores):
    for name, want in BOUNDARY.items():
        assert scores[name] == pytest.approx(want, abs=1e-3), name
    assert scores["ap_boundary"] < scores["ap"]  # boundaries are harder than masks


def test_image_subset_and_empty_results(tmp_path):
    ids = sorted({r["image_id"] for r in json.loads(RESULTS.read_text())})[:10]
    part = evaluate_instance(GT, RESULTS, image_ids=ids)
    assert part["images"] == 10 and part["ap"] != pytest.approx(31.9545, abs=1e-3)
    (tmp_path / "none.json").write_text("[]")
    empty = evaluate_instance(GT, tmp_path / "none.json", boundary=True)
    assert empty["ap"] == 0.0 and empty["ap_boundary"] == 0.0


def test_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: missing COCO results"):
        evaluate_instance(GT, tmp_path / "nope.json")
    bad = json.loads(RESULTS.read_text())[:3]
    del bad[1]["score"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json: results\[1\]: missing field 'score'"):
        evaluate_instance(GT, tmp_path / "bad.json")
    bad[1]["score"] = 0.5
    bad[2]["image_id"] = 123
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"results\[2\]: image_id 123 is not in the ground truth"):
        evaluate_instance(GT, tmp_path / "bad.json")


def test_cli(tmp_path):
    out = tmp_path / "ap.json"
    assert main(["--gt-json", str(GT), "--results-json", str(RESULTS), "--out", str(out)]) == 0
    assert round(json.loads(out.read_text())["ap"], 2) == 31.95
