"""COCO mask AP (pycocotools, the paper's reference) and boundary AP (faster-coco-eval).

``evaluate_instance`` scores a COCO results JSON (``image_id, category_id, segmentation`` as
RLE, ``score``) against an instances JSON with pycocotools' ``COCOeval(iouType="segm")``: AP at
IoU 0.50:0.95, AP50, AP75, AP for small / medium / large objects and the six recalls, in
percent. With ``boundary=True`` it adds the Boundary IoU AP (Cheng et al. 2021, dilation ratio
0.02) computed by faster-coco-eval's ``iouType="boundary"``, which matches the official
boundary-iou-api on the real sample (notes/metrics.md): ``ap_boundary`` and friends.

CLI: ``hcformer evaluate-instance --gt-json F --results-json F [--boundary] --out F.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hcformer.data.base import read_json
from hcformer.errors import DataError

STAT_NAMES = (
    "ap",
    "ap50",
    "ap75",
    "ap_s",
    "ap_m",
    "ap_l",
    "ar_1",
    "ar_10",
    "ar_100",
    "ar_s",
    "ar_m",
    "ar_l",
)


def _load_results(results_json: Path, gt_image_ids: set) -> list[dict[str, Any]]:
    results = read_json(results_json, "COCO results")
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise DataError(f"{results_json}: expected a list of results")
    for j, r in enumerate(results):
        for key in ("image_id", "category_id", "segmentation", "score"):
            if not isinstance(r, dict) or key not in r:
                raise DataError(f"{results_json}: results[{j}]: missing field {key!r}")
        if r["image_id"] not in gt_image_ids:
            raise DataError(
                f"{results_json}: results[{j}]: image_id {r['image_id']} is not in the ground truth"
            )
    return results


def _stats(evaluator: Any, prefix: str = "") -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {f"{name}{prefix}": 100.0 * float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


def evaluate_instance(
    gt_json: str | Path,
    results_json: str | Path,
    boundary: bool = False,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO segm AP (and boundary AP) in percent; ``image_ids`` restricts the images scored."""
    # Here, not at the top: only AP needs pycocotools, which GPU images without it lack, and
    # the semantic metrics of this package run there.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_json, results_json = Path(gt_json), Path(results_json)
    read_json(gt_json, "COCO instances ground truth")  # a clear error for a missing/bad file
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    results = _load_results(results_json, set(gt.getImgIds()))
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(set(image_ids))
    out: dict[str, Any] = {"images": len(ids), "detections": len(results)}
    if not results:  # pycocotools cannot load an empty result list: nothing is detected
        out.update({name: 0.0 for name in STAT_NAMES})
        if boundary:
            out.update({f"{name}_boundary": 0.0 for name in STAT_NAMES})
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))  # loadRes adds fields in place
    ev = COCOeval(gt, dt, iouType="segm")
    ev.params.imgIds = ids
    out.update(_stats(ev))
    if boundary:
        from faster_coco_eval import COCO as FCOCO  # here: only boundary AP needs it
        from faster_coco_eval import COCOeval_faster

        fgt = FCOCO(str(gt_json))
        fdt = fgt.loadRes(copy.deepcopy(results))
        fev = COCOeval_faster(fgt, fdt, iouType="boundary", boundary_dilation_ratio=0.02)
        fev.params.imgIds = ids
        out.update(_stats(fev, "_boundary"))
    return out
