"""Metrics as task objects: each takes the images one at a time and gives its scores at the end.

A metric is built with the :class:`EvalContext` of one evaluation (the dataset, the folder of
the prediction files, the test config, where the Fig. 5 view goes) and then

- ``add(pred, target)`` once per validation image, in dataset order: ``pred`` is the model's
  post-processed prediction of the image (a :class:`Prediction`), ``target`` its
  :class:`ImageTarget`; a metric that scores files writes its prediction file here;
- ``finish() -> dict``: its scores (keys of ``metrics.json``, in percent); a metric that keeps a
  per-class breakdown puts it in :attr:`Metric.details` (one entry of ``predictions/scores.json``).

Which metrics a task uses is one line each in :data:`hcformer.evaluation.tasks.TASK_METRICS`.
The prediction files and their scoring are the official formats and the official-equivalent
evaluators of this package (:mod:`~hcformer.evaluation.formats`, :func:`evaluate_panoptic`,
:func:`evaluate_instance`, :func:`evaluate_semantic`). Numpy only: the model side (torch) is
:mod:`hcformer.engine.predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from hcformer.data.coco_panoptic import panoptic_to_semantic
from hcformer.evaluation.formats import (
    InstanceWriter,
    PanopticWriter,
    save_visual,
    write_label_png,
)
from hcformer.evaluation.instance import evaluate_instance
from hcformer.evaluation.panoptic import evaluate_panoptic
from hcformer.evaluation.semantic import evaluate_semantic
from hcformer.evaluation.undersegmentation import undersegmentation_error


@dataclass(frozen=True)
class EvalContext:
    """What every metric of one evaluation shares.

    dataset: the validation split (:func:`hcformer.data.build_dataset`), with its ``task``,
      ``categories``, ground-truth files, ``image_ids`` and ``stems``.
    out_dir: the folder of the prediction files (``<run>/predictions``, or a temporary folder
      for the periodic validation during training).
    test: the run's ``TestConfig``.
    visual_dir: where ``<stem>.npz`` of the Fig. 5 view go; None: none are written.
    """

    dataset: Any
    out_dir: Path
    test: Any
    visual_dir: Path | None = None


class Prediction(Protocol):
    """The post-processed prediction of one image, numpy, at the image's original size.

    ``semantic``: uint8 ``[H, W]`` train ids (the semantic inference; panoptic models: their
    semantic view); ``panoptic``: the segment-id map int32 ``[H, W]`` and its segments
    (``id, category, isthing, score, area``); ``instances``: ``scores [k]``, ``labels [k]``,
    bool ``masks [k, H, W]``; ``class_map``: uint8 ``[H, W]`` class of each pixel for the Fig. 5
    view (255 = no segment), or None; ``clusters``: per level, level 1 (stride 32 / 2) first,
    the hard cluster map at the resized image size and its stride (empty without clustering).
    """

    semantic: np.ndarray
    panoptic: tuple[np.ndarray, list[dict[str, Any]]]
    instances: dict[str, np.ndarray]
    class_map: np.ndarray | None
    clusters: list[tuple[np.ndarray, int]]


@dataclass
class ImageTarget:
    """One validation image: its index in the split, its record (``hcformer.data`` ``Record``:
    the image and the target at the original size), its ``image_id`` and file stem."""

    index: int
    record: Any
    image_id: Any
    stem: str

    @cached_property
    def regions(self) -> np.ndarray:
        """The ground-truth regions at the original size (255 = ignore): the semantic labels; the
        semantic view of a panoptic target; for instances, instance k is k + 1 (capped at 254),
        crowd regions 255 and the background 0."""
        target = self.record.target
        if "sem_seg" in target:
            return np.asarray(target["sem_seg"]).astype(np.uint8)
        if "pan_seg" in target:
            return panoptic_to_semantic(target["pan_seg"], target["segments"])
        regions = np.zeros(self.record.size, dtype=np.uint8)
        masks = np.asarray(target.get("masks", np.zeros((0, *self.record.size), bool)))
        crowd = np.asarray(target.get("iscrowd", np.zeros(len(masks), bool)), dtype=bool)
        for k, mask in enumerate(masks):
            regions[mask] = 255 if crowd[k] else min(k + 1, 254)
        return regions


class Metric:
    """The base of a task object: built with the :class:`EvalContext`, fed by :meth:`add`,
    scored by :meth:`finish` (see the module docstring)."""

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx
        self.details: dict[str, Any] = {}

    @classmethod
    def applies(cls, ctx: EvalContext) -> bool:
        """Whether this evaluation has what the metric needs (e.g. a ground-truth file)."""
        return True

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, float]:
        raise NotImplementedError


class SemanticSegmentation(Metric):
    """mIoU and pixel accuracy: a PNG of train ids per image under ``semantic/``, scored by
    :func:`evaluate_semantic` (the dataset's mean: detectron2's or Cityscapes')."""

    keys: ClassVar[dict[str, str]] = {"miou": "miou", "pixel_acc": "pixel_acc"}

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.folder = ctx.out_dir / "semantic"
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        write_label_png(pred.semantic, self.folder / f"{target.stem}.png")

    def finish(self) -> dict[str, float]:
        ds = self.ctx.dataset
        sem = evaluate_semantic(ds, ds.gt_dir, self.folder, stems=ds.stems)
        self.details = {"semantic": sem}
        return {name: sem[key] for key, name in self.keys.items()}


class PanopticSemantic(SemanticSegmentation):
    """``miou_pan``: the mIoU of a panoptic model's semantic inference against the semantic view
    of the panoptic ground truth."""

    keys: ClassVar[dict[str, str]] = {"miou": "miou_pan"}


class PanopticQuality(Metric):
    """PQ, SQ, RQ for all, things and stuff: COCO panoptic PNGs under ``panoptic/`` and
    ``panoptic.json``, scored by :func:`evaluate_panoptic` (panopticapi's rules)."""

    keys: ClassVar[tuple[str, ...]] = (
        "pq", "pq_th", "pq_st", "sq", "sq_th", "sq_st", "rq", "rq_th", "rq_st"
    )  # fmt: skip

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.writer = PanopticWriter(
            ctx.out_dir / "panoptic", ctx.out_dir / "panoptic.json", ctx.dataset.categories
        )

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        segment_map, segments = pred.panoptic
        self.writer.add(target.image_id, target.stem, segment_map, segments)

    def finish(self) -> dict[str, float]:
        ds = self.ctx.dataset
        pq = evaluate_panoptic(
            ds.gt_json, ds.gt_dir, self.writer.close(), self.writer.folder, image_ids=ds.image_ids
        )
        self.details = {"panoptic": pq}
        return {key: pq[key] for key in self.keys}


class InstanceAP(Metric):
    """COCO mask AP (``ap ap50 ap75 ap_s ap_m ap_l``, and ``ap_boundary`` with
    ``test.boundary_ap``): a COCO results JSON ``instances_results.json``, scored by
    :func:`evaluate_instance` against the dataset's instances JSON."""

    keys: ClassVar[tuple[str, ...]] = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.writer = InstanceWriter(ctx.out_dir / "instances_results.json", ctx.dataset.categories)

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        inst = pred.instances
        self.writer.add(target.image_id, inst["scores"], inst["labels"], inst["masks"])

    def finish(self) -> dict[str, float]:
        ds, boundary = self.ctx.dataset, self.ctx.test.boundary_ap
        ap = evaluate_instance(
            ds.gt_json, self.writer.close(), boundary=boundary, image_ids=ds.image_ids
        )
        self.details = {"instance": ap}
        out = {key: ap[key] for key in self.keys}
        if boundary:
            out["ap_boundary"] = ap["ap_boundary"]
        return out


class PanopticThingAP(InstanceAP):
    """``ap_th_pan``: the COCO mask AP of a panoptic model's instance inference (thing classes
    only) against the instances JSON of the same images, when the dataset has one."""

    @classmethod
    def applies(cls, ctx: EvalContext) -> bool:
        return ctx.dataset.instances_json is not None

    def finish(self) -> dict[str, float]:
        ds = self.ctx.dataset
        ap = evaluate_instance(ds.instances_json, self.writer.close(), image_ids=ds.image_ids)
        self.details = {"instance": ap}
        return {"ap_th_pan": ap["ap"]}


class Undersegmentation(Metric):
    """``useg_level<i>``: the corrected undersegmentation error of the hard clusters of level i
    against the ground-truth regions, mean over images (none for a model without clustering)."""

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.errors: dict[int, list[float]] = {}

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        for level, (labels, _stride) in enumerate(pred.clusters, start=1):
            error = undersegmentation_error(labels, target.regions)
            self.errors.setdefault(level, []).append(error)

    def finish(self) -> dict[str, float]:
        return {
            f"useg_level{level}": float(np.mean(values))
            for level, values in sorted(self.errors.items())
        }


class Visual(Metric):
    """The Fig. 5 view of the first ``test.visual_images`` images (:func:`save_visual`); no
    scores."""

    @classmethod
    def applies(cls, ctx: EvalContext) -> bool:
        return ctx.visual_dir is not None and ctx.test.visual_images > 0

    def add(self, pred: Prediction, target: ImageTarget) -> None:
        if target.index < self.ctx.test.visual_images:
            save_visual(
                self.ctx.visual_dir / f"{target.stem}.npz",
                target.record.image,
                pred.clusters,
                pred.class_map,
                target.regions,
            )

    def finish(self) -> dict[str, float]:
        return {}
