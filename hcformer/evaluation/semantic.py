"""mIoU and pixel accuracy of semantic predictions (percent).

One confusion matrix over the non-ignored ground-truth pixels (ignore = 255), then two
definitions of the mean, chosen by dataset:

- ``detectron2`` (ADE20K, COCO's panoptic semantic view; what the paper used): the mean of the
  IoUs of the classes that have ground-truth pixels; pixel accuracy = correct / labelled pixels.
- ``cityscapes`` (the official ``evalPixelLevelSemanticLabeling``): the mean over the classes
  whose TP + FP + FN > 0, so a class predicted but absent from the ground truth counts with IoU 0.

The predictions are PNGs of train ids (0..K-1), one per image, named ``<stem>.png`` after the
stem the image and its label share; ``--gt-dir`` is the split's label folder in the dataset's
layout (ADE20K ``annotations/validation``, Cityscapes ``gtFine/val``, or for ``coco_panoptic`` the
panoptic PNG folder with ``--gt-json``).

CLI: ``hcformer evaluate-semantic --dataset ade20k|cityscapes|coco_panoptic --gt-dir D
--pred-dir D --out F.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data import ade20k, cityscapes
from hcformer.data.base import IGNORE_LABEL, field_of, read_json, read_label_png, read_panoptic_png
from hcformer.data.coco_panoptic import panoptic_to_semantic, parse_categories, parse_segments
from hcformer.errors import DataError

MEANS = {"ade20k": "detectron2", "coco_panoptic": "detectron2", "cityscapes": "cityscapes"}


class ConfusionMatrix:
    """Counts ``[gt, pred]`` over labelled pixels; :meth:`scores` gives mIoU and accuracy."""

    def __init__(self, num_classes: int, ignore: int = IGNORE_LABEL) -> None:
        self.num_classes = num_classes
        self.ignore = ignore
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, where: str = "prediction") -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise DataError(
                f"{where}: is {pred.shape[0]}x{pred.shape[1]}, the ground truth {gt.shape[0]}x{gt.shape[1]}"
            )
        keep = gt != self.ignore
        g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
        K = self.num_classes
        if g.size and (g.min() < 0 or g.max() >= K):
            raise DataError(
                f"{where}: ground-truth label {int(g.max())} outside 0..{K - 1} and not {self.ignore}"
            )
        if p.size and (p.min() < 0 or p.max() >= K):
            bad = int(p.max()) if p.max() >= K else int(p.min())
            raise DataError(f"{where}: predicted label {bad} outside the train ids 0..{K - 1}")
        self.matrix += np.bincount(g * K + p, minlength=K * K).reshape(K, K)

    def scores(self, mean: str = "detectron2") -> dict[str, Any]:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        pos_gt, pos_pred = m.sum(1), m.sum(0)
        union = pos_gt + pos_pred - tp
        iou = np.full(self.num_classes, np.nan)
        if mean == "detectron2":
            valid = pos_gt > 0
        elif mean == "cityscapes":
            valid = union > 0
        else:
            raise ValueError(f"unknown mean {mean!r}")
        iou[valid] = tp[valid] / union[valid]
        acc = np.full(self.num_classes, np.nan)
        acc[pos_gt > 0] = tp[pos_gt > 0] / pos_gt[pos_gt > 0]
        total = pos_gt.sum()
        return {
            "miou": 100.0 * float(np.mean(iou[valid])) if valid.any() else 0.0,
            "pixel_acc": 100.0 * float(tp.sum() / total) if total else 0.0,
            "macc": 100.0 * float(np.nanmean(acc)) if (pos_gt > 0).any() else 0.0,
            "iou": [None if np.isnan(v) else 100.0 * float(v) for v in iou],
            "classes_in_mean": int(valid.sum()),
        }


def _pairs(dataset: str, gt_dir: Path, gt_json: Path | None) -> Iterator[tuple[str, Any]]:
    """(stem, loader of the train-id ground truth) for every image of the split."""
    if dataset == "ade20k":
        files = sorted(gt_dir.glob("*.png"))
        k = len(_categories(dataset, gt_dir, gt_json))
        for f in files:
            yield f.stem, lambda f=f: ade20k.label_to_train_ids(read_label_png(f), k, f)
    elif dataset == "cityscapes":
        for f in sorted(gt_dir.glob("*/*_gtFine_labelIds.png")):
            yield (
                f.name[: -len("_gtFine_labelIds.png")],
                lambda f=f: cityscapes.label_ids_to_train_ids(read_label_png(f)),
            )
    elif dataset == "coco_panoptic":
        if gt_json is None:
            raise DataError("coco_panoptic: the semantic view needs --gt-json (the panoptic JSON)")
        data = read_json(gt_json, "COCO panoptic annotations")
        cats = {c["id"]: c for c in parse_categories(data.get("categories"), str(gt_json))}
        for j, ann in enumerate(field_of(data, "annotations", str(gt_json), list)):
            where = f"{gt_json}: annotations[{j}]"
            png = gt_dir / field_of(ann, "file_name", where, str)
            segs = parse_segments(ann.get("segments_info"), cats, where)
            yield (
                png.stem,
                lambda png=png, segs=segs: panoptic_to_semantic(read_panoptic_png(png), segs),
            )
    else:
        raise DataError(f"evaluate-semantic: dataset {dataset!r} is not one of {sorted(MEANS)}")


def _categories(dataset: str, gt_dir: Path, gt_json: Path | None) -> list[dict[str, Any]]:
    if dataset == "ade20k":
        return ade20k.categories(gt_dir.parent.parent)
    if dataset == "cityscapes":
        return cityscapes.categories()
    if gt_json is None:
        raise DataError("coco_panoptic: the semantic view needs --gt-json (the panoptic JSON)")
    return parse_categories(
        read_json(gt_json, "COCO panoptic annotations").get("categories"), str(gt_json)
    )


def evaluate_semantic(
    dataset: str | Any,
    gt_dir: str | Path,
    pred_dir: str | Path,
    *,
    gt_json: str | Path | None = None,
    stems: Iterable[str] | None = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (percent) of ``pred_dir``'s PNGs.

    Every ground-truth image (or every one of ``stems``) needs ``<stem>.png`` in ``pred_dir``.
    ADE20K's class list comes from the dataset folder (``objectInfo150.csv``, else the 150).
    """
    if not isinstance(dataset, str):  # a Dataset from hcformer.data.build_dataset
        gt_json = gt_json or getattr(dataset, "gt_json", None)
        dataset = dataset.name
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gt_json = Path(gt_json) if gt_json is not None else None
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: missing ground-truth folder")
    cats = _categories(dataset, gt_dir, gt_json)
    cm = ConfusionMatrix(len(cats))
    wanted = None if stems is None else set(stems)
    images = 0
    for stem, load_gt in _pairs(dataset, gt_dir, gt_json):
        if wanted is not None and stem not in wanted:
            continue
        pred_file = pred_dir / f"{stem}.png"
        if not pred_file.is_file():
            raise DataError(f"{pred_file}: missing prediction for ground-truth image {stem}")
        cm.update(read_label_png(pred_file), load_gt(), where=str(pred_file))
        images += 1
    if images == 0:
        raise DataError(f"{gt_dir}: no ground-truth labels found for {dataset}")
    res = cm.scores(MEANS[dataset])
    res["per_class"] = {c["name"]: res["iou"][c["train_id"]] for c in cats}
    res["images"] = images
    res["mean"] = MEANS[dataset]
    return res
