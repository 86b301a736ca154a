"""Evaluators that score files and arrays (they know no model), each also a CLI writing JSON.

- ``evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir, image_ids=None)``: PQ/SQ/RQ as
  panopticapi (:mod:`hcformer.evaluation.panoptic`).
- ``evaluate_instance(gt_json, results_json, boundary=False, image_ids=None)``: COCO mask AP via
  pycocotools, boundary AP via faster-coco-eval (:mod:`hcformer.evaluation.instance`).
- ``evaluate_semantic(dataset, gt_dir, pred_dir, gt_json=None, stems=None)``: mIoU and pixel
  accuracy (detectron2's mean for ADE20K and the COCO panoptic semantic view, the official one
  for Cityscapes); ``ConfusionMatrix`` for arrays (:mod:`hcformer.evaluation.semantic`).
- ``undersegmentation_error(labels, gt, ignore=255)``: corrected UE of Neubert & Protzel
  (:mod:`hcformer.evaluation.undersegmentation`).

Every score is in percent, as the paper prints them.

The evaluation of a run folder feeds these through task objects: one class per metric
(:mod:`hcformer.evaluation.metrics`: ``add(pred, target)`` per image, ``finish() -> dict``), the
metrics of each task listed in :data:`hcformer.evaluation.tasks.TASK_METRICS`, the files they
write in :mod:`hcformer.evaluation.formats`.
"""

from __future__ import annotations

from hcformer.evaluation.instance import evaluate_instance
from hcformer.evaluation.panoptic import evaluate_panoptic
from hcformer.evaluation.semantic import ConfusionMatrix, evaluate_semantic
from hcformer.evaluation.undersegmentation import undersegmentation_error

__all__ = [
    "ConfusionMatrix",
    "evaluate_instance",
    "evaluate_panoptic",
    "evaluate_semantic",
    "undersegmentation_error",
]
