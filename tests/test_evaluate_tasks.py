"""Metrics as task objects: ``Evaluator.run`` feeds every image to the metrics of the dataset's
task and merges their scores into ``metrics.json``.

Stand-in models (no training) on 64x64 synthetic data evaluated at its own size: every pixel
predicted as one class, so mIoU, pixel accuracy and the undersegmentation error of a known
cluster grid are counted by hand from the ground truth here; the panoptic and instance files
are checked against what the stand-in predicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcformer.config import build_config, merge, parse_overrides, save_config, to_dict
from hcformer.data import build_dataset
from hcformer.data.base import read_panoptic_png
from hcformer.data.coco_panoptic import panoptic_to_semantic
from hcformer.engine.evaluate import Evaluator, evaluate
from hcformer.evaluation import tasks
from hcformer.evaluation.metrics import Metric
from hcformer.experiments import resolve
from hcformer.runfolder import CONFIG, METRICS

torch.set_num_threads(1)

SIZE = 64
VAL_IMAGES = 3


def make_run(tmp: Path, experiment: str, *extra: str) -> Path:
    """A run folder (``config.yaml`` only) of ``experiment`` at smoke scale on 64x64 synthetic
    data under ``tmp/data`` (shared by the tests of one dataset format)."""
    cfg = resolve(experiment, "smoke")
    overrides = [
        f"data.root={tmp / 'data' / cfg.data.dataset}",
        f"data.synthetic={{train_images: 1, val_images: {VAL_IMAGES}, size: [{SIZE}, {SIZE}]}}",
        f"data.test_short={SIZE}",
        f"data.test_max={SIZE}",
        "tracking.enabled=false",
        *extra,
    ]
    cfg = build_config(merge(to_dict(cfg), parse_overrides(overrides)))
    run = tmp / "run"
    run.mkdir(parents=True)
    save_config(cfg, run / CONFIG)
    return run


class StandIn(torch.nn.Module):
    """Predicts ``label`` at every pixel: per-pixel (``sem_logits`` at stride 4) or as mask
    classification (query 0 of class ``label`` with probability ~1, its mask everywhere; the
    other queries "no object"). With ``clusters``, one clustering module at stride 16 whose
    every pixel joins the stride-32 cell right below it: 32x32 blocks."""

    def __init__(
        self, num_classes: int, label: int, per_pixel: bool, clusters: bool = False
    ) -> None:
        super().__init__()
        self.k, self.label, self.per_pixel, self.clusters = num_classes, label, per_pixel, clusters

    def forward(self, images: torch.Tensor) -> dict:
        b, _, h, w = images.shape
        if self.per_pixel:
            logits = torch.zeros(b, self.k, h // 4, w // 4)
            logits[:, self.label] = 5.0
            out = {"sem_logits": logits}
        else:
            queries = 2
            cls = torch.full((b, queries, self.k + 1), -20.0)
            cls[:, :, self.k] = 20.0
            cls[:, 0, self.k], cls[:, 0, self.label] = -20.0, 20.0
            out = {"pred_logits": cls, "pred_masks": torch.full((b, queries, h // 4, w // 4), 10.0)}
        if self.clusters:
            assignment = torch.zeros(b, 9, h // 16, w // 16)
            assignment[:, 4] = 1.0  # the candidate right below (dy = dx = 0)
            out["assignments"] = [assignment]
        return out


def stand_in_evaluate(monkeypatch, run: Path, model: torch.nn.Module) -> dict:
    """``hcformer evaluate``'s :func:`evaluate` with ``model`` as the final weights."""

    def load_model(self):
        self.iterations = self.cfg.solver.iterations
        return model

    monkeypatch.setattr(Evaluator, "load_model", load_model)
    return evaluate(run)


def constant_scores(gts: list[np.ndarray], label: int) -> tuple[float, float]:
    """mIoU (detectron2's mean: over the classes with ground truth) and pixel accuracy, percent,
    of predicting ``label`` at every labelled pixel."""
    gt = np.concatenate([g.ravel() for g in gts])
    gt = gt[gt != 255]
    hits = int((gt == label).sum())
    iou = hits / gt.size  # the union of `label` is every labelled pixel; other classes score 0
    return 100.0 * iou / len(np.unique(gt)), 100.0 * hits / gt.size


def block_useg(gt: np.ndarray, block: int) -> float:
    """Corrected undersegmentation error (percent) of square ``block`` clusters, by definition."""
    h, w = gt.shape
    clusters = (np.arange(h)[:, None] // block) * (w // block) + np.arange(w)[None] // block
    keep = gt != 255
    leak = 0
    for s in np.unique(clusters):
        in_s = (clusters == s) & keep
        for g in np.unique(gt[keep]):
            inter = int((in_s & (gt == g)).sum())
            if inter:
                leak += min(inter, int(in_s.sum()) - inter)
    return 100.0 * leak / int(keep.sum())


def most_frequent(gts: list[np.ndarray]) -> int:
    values = np.concatenate([g.ravel() for g in gts])
    return int(np.bincount(values[values != 255]).argmax())


@pytest.mark.parametrize(
    "experiment, per_pixel",
    [("ade20k/hcformer-r50-L3-D8-Q100", False), ("ade20k/pspnet-r101-L3", True)],
)
def test_semantic_task_scores_a_constant_prediction_as_counted_by_hand(
    tmp_path, monkeypatch, experiment, per_pixel
):
    run = make_run(tmp_path, experiment)
    cfg = Evaluator(run).cfg
    ds = build_dataset(cfg.data, "val")
    gts = [np.asarray(ds.load(i).target["sem_seg"]) for i in range(len(ds))]
    label = most_frequent(gts)
    model = StandIn(cfg.model.num_classes, label, per_pixel, clusters=True)

    metrics = stand_in_evaluate(monkeypatch, run, model)

    miou, acc = constant_scores(gts, label)
    assert metrics["miou"] == pytest.approx(miou) and metrics["pixel_acc"] == pytest.approx(acc)
    assert metrics["useg_level1"] == pytest.approx(np.mean([block_useg(g, 32) for g in gts]))
    assert (metrics["images"], metrics["iterations"]) == (VAL_IMAGES, cfg.solver.iterations)
    assert set(metrics) == {
        *("miou", "pixel_acc", "useg_level1"),
        *("iterations", "images", "eval_seconds"),
    }
    assert json.loads((run / METRICS).read_text()) == metrics
    details = json.loads((run / "predictions" / "scores.json").read_text())
    assert list(details) == ["semantic"] and details["semantic"]["images"] == VAL_IMAGES
    for stem in ds.stems:
        png = np.asarray(Image.open(run / "predictions" / "semantic" / f"{stem}.png"))
        assert (png == label).all()
    # The Fig. 5 view: the constant class, the 32x32 blocks of level 1 (a stride-16 map).
    view = np.load(run / "visual" / f"{ds.stems[0]}.npz")
    assert (view["pred"] == label).all() and (view["gt"] == gts[0]).all()
    assert view["stride"].tolist() == [16] and view["clusters"].shape == (1, SIZE, SIZE)
    assert view["clusters"][0, 31, 33] == 1 and view["clusters"][0, 40, 10] == 2


def test_panoptic_task_writes_and_scores_under_the_folder_it_is_given(tmp_path):
    """Periodic validation: predictions and scores.json in ``out_dir`` alone, no visual, no
    metrics.json; the PQ family, ``ap_th_pan`` and ``miou_pan`` of the one whole-image
    segment each image gets."""
    experiment = "coco_panoptic/hcformer-r50-L3-D8-Q100"
    run = make_run(tmp_path, experiment)
    evaluator = Evaluator(run)
    ds = build_dataset(evaluator.cfg.data, "val")
    gts = []
    for i in range(len(ds)):
        target = ds.load(i).target
        gts.append(panoptic_to_semantic(target["pan_seg"], target["segments"]))
    label = most_frequent(gts)
    evaluator.iterations = 4
    out = tmp_path / "validation"

    metrics = evaluator.run(
        StandIn(evaluator.cfg.model.num_classes, label, per_pixel=False), out_dir=out
    )

    pq_keys = [f"{m}{s}" for m in ("pq", "sq", "rq") for s in ("", "_th", "_st")]
    assert list(metrics) == [
        *pq_keys,
        *("ap_th_pan", "miou_pan", "iterations", "images", "eval_seconds"),
    ]
    assert metrics["miou_pan"] == pytest.approx(constant_scores(gts, label)[0])
    assert all(0.0 <= metrics[k] <= 100.0 for k in (*pq_keys, "ap_th_pan"))
    predictions = json.loads((out / "panoptic.json").read_text())
    category = ds.categories[label]["id"]
    for ann in predictions["annotations"]:
        (segment,) = ann["segments_info"]
        assert segment["category_id"] == category and segment["area"] == SIZE * SIZE
        assert (read_panoptic_png(out / "panoptic" / ann["file_name"]) == segment["id"]).all()
    assert sorted(json.loads((out / "scores.json").read_text())) == [
        "instance",
        "panoptic",
        "semantic",
    ]
    assert not (run / "predictions").exists() and not (run / "visual").exists()
    assert not (run / METRICS).exists()


def test_instance_task_writes_top_k_of_every_image_and_boundary_ap(tmp_path, monkeypatch):
    experiment = "coco_instance/hcformer-r50-L3-D8-Q100"
    run = make_run(tmp_path, experiment, "test.boundary_ap=true")
    k = Evaluator(run).cfg.model.num_classes

    metrics = stand_in_evaluate(monkeypatch, run, StandIn(k, 0, per_pixel=False))

    ap_keys = ["ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ap_boundary"]
    assert list(metrics) == [*ap_keys, "iterations", "images", "eval_seconds"]
    results = json.loads((run / "predictions" / "instances_results.json").read_text())
    assert len(results) == VAL_IMAGES * 2 * k  # 2 queries x k classes < instance_topk (100)
    assert json.loads((run / "predictions" / "scores.json").read_text())["instance"][
        "detections"
    ] == len(results)
    # The Fig. 5 view of an instance model has no class map: 255 everywhere.
    view = np.load(next((run / "visual").glob("*.npz")))
    assert (view["pred"] == 255).all() and view["clusters"].shape[0] == 0


class ImagesSeen(Metric):
    """A new metric: the stems it was given, in order, and a score of its own."""

    calls: list[str] = []
    finished = 0

    def add(self, pred, target) -> None:
        assert pred.semantic.shape == (SIZE, SIZE)
        ImagesSeen.calls.append(target.stem)

    def finish(self) -> dict[str, float]:
        ImagesSeen.finished += 1
        return {"images_seen": float(len(ImagesSeen.calls))}


def test_a_metric_added_to_a_task_is_fed_every_image_and_lands_in_metrics_json(
    tmp_path, monkeypatch
):
    experiment = "ade20k/pspnet-r101-L3"
    run = make_run(tmp_path, experiment)
    monkeypatch.setitem(
        tasks.TASK_METRICS, "semantic", (*tasks.TASK_METRICS["semantic"], ImagesSeen)
    )
    monkeypatch.setattr(ImagesSeen, "calls", [])
    monkeypatch.setattr(ImagesSeen, "finished", 0)

    metrics = stand_in_evaluate(monkeypatch, run, StandIn(8, 1, per_pixel=True))

    ds = build_dataset(Evaluator(run).cfg.data, "val")
    assert ImagesSeen.calls == ds.stems and ImagesSeen.finished == 1
    assert json.loads((run / METRICS).read_text())["images_seen"] == VAL_IMAGES
    assert "miou" in metrics


def test_every_task_has_metrics_and_an_unknown_task_is_refused():
    assert set(tasks.TASK_METRICS) == {"semantic", "panoptic", "instance"}
    from hcformer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.task: 'depth' has no metrics \(expected one of"):
        tasks.build_metrics("depth", None)
