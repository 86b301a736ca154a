"""PQ as panopticapi: real COCO ground truth, perturbed predictions, and hand-computed cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcformer.commands.evaluate_panoptic import main
from hcformer.data.base import id2rgb, rgb2id
from hcformer.errors import DataError
from hcformer.evaluation import evaluate_panoptic

FIX = Path(__file__).parent / "fixtures" / "coco_panoptic_val2017"
GT_JSON, GT_DIR = FIX / "panoptic_examples.json", FIX / "panoptic_examples"


def test_real_ground_truth_against_itself_is_100():
    res = evaluate_panoptic(GT_JSON, GT_DIR, GT_JSON, GT_DIR)
    gt = json.loads(GT_JSON.read_text())
    things = {c["id"] for c in gt["categories"] if c["isthing"]}
    present = {
        s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]
    }
    assert res["pq"] == res["sq"] == res["rq"] == 100.0
    assert res["pq_th"] == res["pq_st"] == 100.0
    assert res["n"] == len(present) and res["n_th"] == len(present & things)
    assert res["images"] == 2


def _write_prediction(tmp: Path, drop: set[int], relabel: dict[int, int]) -> tuple[Path, Path]:
    """The ground truth as a prediction, with segments dropped (-> VOID) or relabelled."""
    gt = json.loads(GT_JSON.read_text())
    out = tmp / "pred"
    out.mkdir()
    anns = []
    for a in gt["annotations"]:
        pan = rgb2id(np.asarray(Image.open(GT_DIR / a["file_name"])))
        segs = []
        for s in a["segments_info"]:
            if s["id"] in drop:
                pan[pan == s["id"]] = 0
                continue
            segs.append({"id": s["id"], "category_id": relabel.get(s["id"], s["category_id"])})
        Image.fromarray(id2rgb(pan)).save(out / a["file_name"])
        anns.append({"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": segs})
    (tmp / "pred.json").write_text(json.dumps({"annotations": anns}))
    return tmp / "pred.json", out


def _expected_pq(drop: set[int], relabel: dict[int, int]) -> dict[str, float]:
    """Independent count: every kept segment matches itself with IoU 1 (areas are exact)."""
    gt = json.loads(GT_JSON.read_text())
    isthing = {c["id"]: bool(c["isthing"]) for c in gt["categories"]}
    tp, fp, fn = {}, {}, {}
    for a in gt["annotations"]:
        for s in a["segments_info"]:
            c = s["category_id"]
            if s["iscrowd"]:
                continue
            if s["id"] in drop:
                fn[c] = fn.get(c, 0) + 1
            elif s["id"] in relabel:
                fn[c] = fn.get(c, 0) + 1
                fp[relabel[s["id"]]] = fp.get(relabel[s["id"]], 0) + 1
            else:
                tp[c] = tp.get(c, 0) + 1
    out = {}
    for key, want in (("pq", None), ("pq_th", True), ("pq_st", False)):
        vals = []
        for c in set(tp) | set(fp) | set(fn):
            if want is not None and isthing[c] != want:
                continue
            t, p, n = tp.get(c, 0), fp.get(c, 0), fn.get(c, 0)
            vals.append(t / (t + 0.5 * p + 0.5 * n))
        out[key] = 100 * sum(vals) / len(vals)
    return out


def test_real_ground_truth_against_perturbed_predictions(tmp_path):
    gt = json.loads(GT_JSON.read_text())
    segs = [s for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]]
    persons = [s["id"] for s in segs if s["category_id"] == 1]
    stuff = [s for s in segs if s["category_id"] > 91]
    drop = {persons[0], stuff[0]["id"]}
    relabel = {persons[1]: 2}  # a person called a bicycle: FN for person, FP for bicycle
    pred_json, pred_dir = _write_prediction(tmp_path, drop, relabel)
    res = evaluate_panoptic(GT_JSON, GT_DIR, pred_json, pred_dir)
    want = _expected_pq(drop, relabel)
    for key in want:
        assert res[key] == pytest.approx(want[key], abs=1e-9), key
    person_fn = sum(s["category_id"] == 1 and (s["id"] in drop or s["id"] in relabel) for s in segs)
    assert res["pq"] < 100 and res["per_class"]["person"]["fn"] == person_fn >= 2


def _paint(rows: list[tuple]) -> np.ndarray:
    """A 10x10 id map; rows are (id, category, iscrowd, pixels), painted in order."""
    pan = np.zeros((10, 10), np.int32)
    for seg_id, _, _, sl in rows:
        pan[sl] = seg_id
    return pan


def _segments(rows: list[tuple], pan: np.ndarray, with_area: bool) -> list[dict]:
    segs = {}
    for seg_id, cat, crowd, _ in rows:
        segs[seg_id] = {"id": seg_id, "category_id": cat, "iscrowd": crowd}
        if with_area:
            segs[seg_id]["area"] = int((pan == seg_id).sum())
    return list(segs.values())


CATS = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]
GT_ROWS = [  # rows 0-3 thing "a" (40 px), rows 4-8 stuff "b" (50 px), row 9: VOID | crowd of "a"
    (1, 1, 0, np.s_[0:4, :]),
    (2, 2, 0, np.s_[4:9, :]),
    (3, 1, 1, np.s_[9, 5:]),
]
# S1: "a": pred 11 = 20 px inside the 40 px of gt 1 -> IoU exactly 0.5, not > 0.5: FN + FP
# (pred 11 is on neither VOID nor crowd). "b": pred 12 = 70 px, 50 on gt 2 -> IoU 50/70.
# Pred 13 (row 9): 5 px on VOID + 5 on the crowd of its own class "a" -> ignored.
S1 = [(11, 1, 0, np.s_[0:2, :]), (12, 2, 0, np.s_[2:9, :]), (13, 1, 0, np.s_[9, :])]
# S2: pred 12 = rows 2-9 less (2, 0) and row 9 cols 5-9 = 74 px, 5 of them on VOID, 50 on gt 2
# -> union 74 + 50 - 50 - 5 = 69, IoU 50/69. Pred 11 = rows 0-1 + (2, 0) = 21 px -> IoU 21/40,
# a match. Pred 14 ("b") lies on the crowd of "a", not of "b" -> FP.
S2 = [
    (12, 2, 0, np.s_[2:10, :]),
    (14, 2, 0, np.s_[9, 5:]),
    (11, 1, 0, np.s_[0:2, :]),
    (11, 1, 0, np.s_[2, 0:1]),
]


def _run_cases(tmp: Path, cases: dict[str, list]) -> dict:
    gt_anns, pred_anns = [], []
    for kind in ("gt", "pred"):
        (tmp / kind).mkdir(parents=True)
    gt_pan = _paint(GT_ROWS)
    for k, (name, rows) in enumerate(cases.items()):
        pred_pan = _paint(rows)
        Image.fromarray(id2rgb(gt_pan)).save(tmp / "gt" / f"{name}.png")
        Image.fromarray(id2rgb(pred_pan)).save(tmp / "pred" / f"{name}.png")
        gt_anns.append(
            {
                "image_id": k,
                "file_name": f"{name}.png",
                "segments_info": _segments(GT_ROWS, gt_pan, True),
            }
        )
        pred_anns.append(
            {
                "image_id": k,
                "file_name": f"{name}.png",
                "segments_info": _segments(rows, pred_pan, False),
            }
        )
    (tmp / "gt.json").write_text(
        json.dumps({"annotations": gt_anns, "categories": CATS, "images": []})
    )
    (tmp / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return evaluate_panoptic(tmp / "gt.json", tmp / "gt", tmp / "pred.json", tmp / "pred")


def test_hand_case_iou_boundary_void_and_crowd(tmp_path):
    res = _run_cases(tmp_path, {"s1": S1})
    assert (
        res["pq_th"] == 0.0
        and res["per_class"]["a"]["fp"] == 1
        and res["per_class"]["a"]["fn"] == 1
    )
    assert res["pq_st"] == pytest.approx(100 * 50 / 70)
    assert res["pq"] == pytest.approx(100 * (0 + 50 / 70) / 2)
    assert res["rq_st"] == 100.0 and res["sq_st"] == pytest.approx(100 * 50 / 70)


def test_hand_case_match_void_union_and_crowd_of_other_class(tmp_path):
    res = _run_cases(tmp_path, {"s2": S2})
    pa, pb = 21 / 40, (50 / 69) / 1.5
    assert res["per_class"]["a"]["pq"] == pytest.approx(100 * pa)
    assert res["per_class"]["b"]["pq"] == pytest.approx(100 * pb)
    assert res["per_class"]["b"]["fp"] == 1 and res["rq_st"] == pytest.approx(100 / 1.5)
    assert res["sq_st"] == pytest.approx(100 * 50 / 69)
    assert res["pq"] == pytest.approx(100 * (pa + pb) / 2)


def test_the_50_percent_rule_is_strict(tmp_path):
    # Pred 13 ("a") = 4 px on VOID + 4 px on gt "b": 4/8 = 0.5 is not > 0.5 -> FP.
    rows = [(12, 2, 0, np.s_[4:9, :]), (11, 1, 0, np.s_[0:4, :]), (13, 1, 0, np.s_[8:10, 0:4])]
    res = _run_cases(tmp_path, {"half": rows})
    assert res["per_class"]["a"]["fp"] == 1 and res["per_class"]["a"]["tp"] == 1


def test_per_category_accumulation_over_the_dataset(tmp_path):
    res = _run_cases(tmp_path, {"s1": S1, "s2": S2})
    # "a": TP 1 (IoU .525), FP 1, FN 1; "b": TP 2 (50/70, 50/69), FP 1 -- summed, then divided.
    pa = (21 / 40) / (1 + 0.5 + 0.5)
    pb = (50 / 70 + 50 / 69) / (2 + 0.5)
    assert res["pq"] == pytest.approx(100 * (pa + pb) / 2)
    assert res["pq_th"] == pytest.approx(100 * pa) and res["pq_st"] == pytest.approx(100 * pb)


def test_errors_name_the_file_and_segment(tmp_path):
    pred_json, pred_dir = _write_prediction(tmp_path, set(), {})
    good = pred_json.read_text()
    data = json.loads(good)
    removed = data["annotations"][0]["segments_info"].pop()
    pred_json.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=rf"segment {removed['id']} is in the PNG but not in 'segments_info'"
    ):
        evaluate_panoptic(GT_JSON, GT_DIR, pred_json, pred_dir)
    data = json.loads(good)
    data["annotations"].pop()
    pred_json.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"pred.json: no prediction for image"):
        evaluate_panoptic(GT_JSON, GT_DIR, pred_json, pred_dir)
    bad = tmp_path / "bad_gt.json"
    gt = json.loads(GT_JSON.read_text())
    del gt["annotations"][1]["segments_info"][0]["category_id"]
    bad.write_text(json.dumps(gt))
    with pytest.raises(
        DataError,
        match=r"bad_gt.json: annotations\[1\]: segments_info\[0\]: missing field 'category_id'",
    ):
        evaluate_panoptic(bad, GT_DIR, GT_JSON, GT_DIR)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty/000000142238.png: missing panoptic PNG"):
        evaluate_panoptic(GT_JSON, empty, GT_JSON, GT_DIR)


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "m" / "pq.json"
    args = ["--gt-json", str(GT_JSON), "--gt-dir", str(GT_DIR), "--pred-json", str(GT_JSON)]
    assert main([*args, "--pred-dir", str(GT_DIR), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pq"] == 100.0
    assert "PQ 100.00" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "m")
