"""Panoptic quality (Kirillov et al. 2019) exactly as panopticapi's ``pq_compute``.

Per image, a predicted and a ground-truth segment of the same category match when their IoU is
above 0.5, where the union leaves out the prediction's pixels on VOID (id 0) ground truth; crowd
ground-truth segments are never matched. Unmatched non-crowd ground truth is a false negative;
an unmatched prediction is a false positive unless more than half of it lies on VOID or on a
crowd region of its category. TP, FP, FN and the IoU sum accumulate per category over the
dataset; PQ = sum IoU / (TP + FP/2 + FN/2) per category, SQ = sum IoU / TP, RQ = PQ / SQ,
averaged over the categories that occur (TP + FP + FN > 0), for all, things and stuff.
Ground-truth areas are the JSON's ``area`` fields (as panopticapi); prediction areas are counted
from the PNGs. Scores are in percent.

CLI: ``hcformer evaluate-panoptic --gt-json F --gt-dir D --pred-json F --pred-dir D --out F.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data.base import field_of, read_json, read_panoptic_png
from hcformer.errors import DataError

VOID = 0
OFFSET = 256 * 256 * 256


@dataclass
class PQStat:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0


def _segments(ann: dict[str, Any], where: str, categories: dict[int, Any]) -> dict[int, dict]:
    segs = {}
    for j, s in enumerate(field_of(ann, "segments_info", where, list)):
        at = f"{where}: segments_info[{j}]"
        seg_id = field_of(s, "id", at, int)
        cat = field_of(s, "category_id", at, int)
        if cat not in categories:
            raise DataError(f"{at}: unknown category_id {cat}")
        segs[seg_id] = {
            "category_id": cat,
            "iscrowd": int(s.get("iscrowd", 0)),
            "area": s.get("area"),
        }
    return segs


def pq_image(
    pan_gt: np.ndarray,
    gt_segms: dict[int, dict],
    pan_pred: np.ndarray,
    pred_segms: dict[int, dict],
    stats: dict[int, PQStat],
    where: str = "prediction",
) -> None:
    """Accumulate one image into ``stats`` (panopticapi's ``pq_compute_single_core``).

    ``gt_segms`` / ``pred_segms`` map segment id -> ``category_id``, ``iscrowd``, ``area`` (the
    ground truth's area is used as given; the prediction's is counted here).
    """
    if pan_gt.shape != pan_pred.shape:
        raise DataError(
            f"{where}: PNG is {pan_pred.shape[0]}x{pan_pred.shape[1]}, ground truth {pan_gt.shape[0]}x{pan_gt.shape[1]}"
        )
    pred_segms = {k: dict(v) for k, v in pred_segms.items()}
    labels, counts = np.unique(pan_pred, return_counts=True)
    left = set(pred_segms)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise DataError(f"{where}: segment {label} is in the PNG but not in 'segments_info'")
        pred_segms[label]["area"] = count
        left.discard(label)
    if left:
        raise DataError(
            f"{where}: segments {sorted(left)} are in 'segments_info' but not in the PNG"
        )

    joint = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
    labels, counts = np.unique(joint, return_counts=True)
    inter = {(int(lb // OFFSET), int(lb % OFFSET)): int(c) for lb, c in zip(labels, counts)}

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), intersection in inter.items():
        if gt_id not in gt_segms or pred_id not in pred_segms:
            continue
        gt, pred = gt_segms[gt_id], pred_segms[pred_id]
        if gt["iscrowd"] == 1 or gt["category_id"] != pred["category_id"]:
            continue
        union = pred["area"] + gt["area"] - intersection - inter.get((VOID, pred_id), 0)
        iou = intersection / union
        if iou > 0.5:
            st = stats.setdefault(gt["category_id"], PQStat())
            st.tp += 1
            st.iou += iou
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_by_cat = {}
    for gt_id, gt in gt_segms.items():
        if gt_id in gt_matched:
            continue
        if gt["iscrowd"] == 1:
            crowd_by_cat[gt["category_id"]] = gt_id
            continue
        stats.setdefault(gt["category_id"], PQStat()).fn += 1

    for pred_id, pred in pred_segms.items():
        if pred_id in pred_matched:
            continue
        on_void = inter.get((VOID, pred_id), 0)
        if pred["category_id"] in crowd_by_cat:
            on_void += inter.get((crowd_by_cat[pred["category_id"]], pred_id), 0)
        if on_void / pred["area"] > 0.5:
            continue
        stats.setdefault(pred["category_id"], PQStat()).fp += 1


def pq_average(stats: dict[int, PQStat], categories: dict[int, dict], isthing: bool | None) -> dict:
    """PQ, SQ, RQ (fractions) averaged over the categories with TP + FP + FN > 0."""
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for cat_id, cat in categories.items():
        if isthing is not None and bool(cat.get("isthing", 1)) != isthing:
            continue
        st = stats.get(cat_id, PQStat())
        if st.tp + st.fp + st.fn == 0:
            continue
        n += 1
        pq_c = st.iou / (st.tp + 0.5 * st.fp + 0.5 * st.fn)
        sq_c = st.iou / st.tp if st.tp else 0.0
        rq_c = st.tp / (st.tp + 0.5 * st.fp + 0.5 * st.fn)
        per_class[cat_id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
        pq, sq, rq = pq + pq_c, sq + sq_c, rq + rq_c
    if n == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0, "per_class": per_class}
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n, "per_class": per_class}


def summarize(stats: dict[int, PQStat], categories: dict[int, dict]) -> dict[str, Any]:
    """The JSON of the evaluator: ``pq, sq, rq`` (+ ``_th``, ``_st``) and per class, in percent."""
    out: dict[str, Any] = {}
    for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
        res = pq_average(stats, categories, isthing)
        for key in ("pq", "sq", "rq"):
            out[f"{key}{suffix}"] = 100.0 * res[key]
        out[f"n{suffix}"] = res["n"]
        if isthing is None:
            out["per_class"] = {
                categories[c]["name"]: {k: 100.0 * v for k, v in r.items()}
                | {"tp": stats[c].tp, "fp": stats[c].fp, "fn": stats[c].fn}
                for c, r in res["per_class"].items()
            }
    return out


def evaluate_panoptic(
    gt_json: str | Path,
    gt_dir: str | Path,
    pred_json: str | Path,
    pred_dir: str | Path,
    image_ids: Iterable[int | str] | None = None,
) -> dict[str, Any]:
    """PQ/SQ/RQ of COCO-format panoptic predictions against the ground truth (percent).

    Every ground-truth image (or every one of ``image_ids``) needs a prediction, as panopticapi.
    The prediction JSON is ``{"annotations": [{"image_id", "file_name", "segments_info"}]}``;
    its ``categories`` are ignored (the ground truth's are used).
    """
    gt_json, pred_json, gt_dir, pred_dir = (
        Path(gt_json),
        Path(pred_json),
        Path(gt_dir),
        Path(pred_dir),
    )
    gt = read_json(gt_json, "panoptic ground truth")
    pred = read_json(pred_json, "panoptic predictions")
    categories = {}
    for j, c in enumerate(field_of(gt, "categories", str(gt_json), list)):
        categories[field_of(c, "id", f"{gt_json}: categories[{j}]", int)] = c
    pred_by_image = {}
    for j, ann in enumerate(field_of(pred, "annotations", str(pred_json), list)):
        pred_by_image[field_of(ann, "image_id", f"{pred_json}: annotations[{j}]", (int, str))] = ann
    wanted = None if image_ids is None else set(image_ids)
    stats: dict[int, PQStat] = {}
    images = 0
    for j, gt_ann in enumerate(field_of(gt, "annotations", str(gt_json), list)):
        where = f"{gt_json}: annotations[{j}]"
        image_id = field_of(gt_ann, "image_id", where, (int, str))
        if wanted is not None and image_id not in wanted:
            continue
        if image_id not in pred_by_image:
            raise DataError(f"{pred_json}: no prediction for image {image_id}")
        pred_ann = pred_by_image[image_id]
        pwhere = f"{pred_json}: prediction of image {image_id}"
        gt_segms = _segments(gt_ann, where, categories)
        for seg_id, s in gt_segms.items():
            if not isinstance(s["area"], int):
                raise DataError(f"{where}: segment {seg_id}: field 'area' should be an integer")
        pred_segms = _segments(pred_ann, pwhere, categories)
        pan_gt = read_panoptic_png(gt_dir / field_of(gt_ann, "file_name", where, str))
        pan_pred = read_panoptic_png(pred_dir / field_of(pred_ann, "file_name", pwhere, str))
        pq_image(pan_gt, gt_segms, pan_pred, pred_segms, stats, where=pwhere)
        images += 1
    out = summarize(stats, categories)
    out["images"] = images
    return out
