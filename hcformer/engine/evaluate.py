"""``hcformer evaluate --run-dir DIR``: score a trained run folder and write ``metrics.json``.

Loads ``model_final.pt``, runs the model on the validation split (test-time resize of the config,
padded to a multiple of 32 with the pixel mean, i.e. 0 once normalised; no test-time
augmentation), post-processes the final prediction as MaskFormer
(:mod:`hcformer.models.postprocess`: the masks at the model's output stride (HCFormer:
32 / 2**L) -> one bilinear resize to the padded input -> crop -> resize to the original
image), writes the predictions under ``DIR/predictions`` in the official formats and scores
them with :mod:`hcformer.evaluation`. Metrics, in percent as the paper prints them:

- coco_panoptic: ``pq pq_th pq_st`` (+ ``sq rq``), ``ap_th_pan`` (COCO mask AP of the thing
  masks of the panoptic model, top-100 instance inference restricted to thing classes, against
  the instances JSON of the same images) and ``miou_pan`` (mIoU of the semantic inference against
  the panoptic ground truth's semantic view);
- coco_instance: ``ap ap50 ap75 ap_s ap_m ap_l`` (+ ``ap_boundary`` when ``test.boundary_ap``);
- ade20k, cityscapes: ``miou pixel_acc``;
- ``useg_level<i>`` for i = 1..L: the corrected undersegmentation error of the hard clusters after
  i clustering steps down from stride 32 (level L is the finest: stride 4 when L = 3), from
  :func:`hcformer.ops.hard_clusters` on the model's assignments, against the ground-truth
  regions (semantic labels; the semantic view for panoptic; instances for coco_instance), mean
  over images;
- ``iterations`` (training iterations of the weights), ``images``, ``eval_seconds``.

Fast paths, evaluation only (``--fuse --channels-last --dtype bfloat16 --compile [MODE]
--cuda-graph``): :func:`hcformer.models.fuse.optimize_for_inference` on the loaded model; without
them the plain model runs.

``metrics.json`` is written atomically and last: its presence means the run is complete. Scores
broken down per class go to ``predictions/scores.json``.

Fig. 5-style data: for the first ``test.visual_images`` val images, ``DIR/visual/<stem>.npz``
with the keys

- ``image``: uint8 ``[H, W, 3]`` RGB at the original size;
- ``clusters``: int32 ``[L, H, W]``, the hard cluster map of each level (row i = level i + 1, so
  the last row is the finest), each value the index of the coarsest cell the pixel belongs to,
  upsampled nearest to the image size (``[0, H, W]`` for a model without clustering modules);
- ``pred``: uint8 ``[H, W]``, the predicted class (train id) of each pixel: semantic argmax, or
  for panoptic the category of the pixel's segment; 255 = no segment;
- ``gt``: uint8 ``[H, W]``, the ground-truth class (train id; panoptic: the semantic view;
  coco_instance: the instance index + 1 with 0 = background), 255 = ignore;
- ``stride``: int32 ``[L]``, the stride of each level's cluster map before upsampling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hcformer.errors import HCFormerError
from hcformer.families import head_entry
from hcformer.runfolder import PREDICTIONS, VISUAL


def gt_regions(dataset: Any, index: int, record: Any) -> np.ndarray:
    """The ground-truth regions of an image at its original size (255 = ignore)."""
    target = record.target
    if "sem_seg" in target:
        return np.asarray(target["sem_seg"]).astype(np.uint8)
    if "pan_seg" in target:
        from hcformer.data.coco_panoptic import panoptic_to_semantic

        return panoptic_to_semantic(target["pan_seg"], target["segments"])
    regions = np.zeros(record.size, dtype=np.uint8)
    masks = np.asarray(target.get("masks", np.zeros((0, *record.size), bool)))
    crowd = np.asarray(target.get("iscrowd", np.zeros(len(masks), bool)), dtype=bool)
    for k, mask in enumerate(masks):
        regions[mask] = 255 if crowd[k] else min(k + 1, 254)
    return regions


class Evaluator:
    """Inference over the validation split of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, *, device: str | None = None, inference=None) -> None:
        import torch

        from hcformer.engine.runinfo import read_run

        self.run_dir = Path(run_dir)
        self.cfg, self.info = read_run(self.run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.inference = inference  # hcformer.models.fuse.InferenceOptions; None: the plain model

    def load_model(self):

        from hcformer.engine.checkpoint import load_checkpoint
        from hcformer.models import build_model
        from hcformer.runfolder import FINAL_WEIGHTS

        path = self.run_dir / FINAL_WEIGHTS
        if not path.is_file():
            raise HCFormerError(
                f"{path}: no final weights; train first (hcformer train ... --run-dir {self.run_dir})"
            )
        model = build_model(self.cfg.model)
        model.load_state_dict(load_checkpoint(path))
        self.iterations = self.cfg.solver.iterations  # model_final.pt exists once all are done
        model = model.to(self.device).eval()
        if self.inference is None:
            return model
        from hcformer.models.fuse import apply_options

        return apply_options(model, self.inference, inplace=True)

    def run(
        self,
        model: Any = None,
        *,
        out_dir: Path | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any] | None:
        """Score ``model_final.pt``: predictions under ``predictions/``, ``metrics.json``.

        With ``model`` (periodic validation during training; set :attr:`iterations` first):
        that model as it is, predictions and ``scores.json`` under ``out_dir``, no visuals, no
        ``metrics.json``; returns None as soon as ``stop()`` is true (checked between batches).
        """
        import torch

        from hcformer.data import build_dataset, collate, test_transform
        from hcformer.engine.batches import eval_pad_value
        from hcformer.engine.predictions import InstanceWriter, PanopticWriter, SemanticWriter
        from hcformer.engine.runinfo import check_num_classes
        from hcformer.evaluation import undersegmentation_error
        from hcformer.models import postprocess as pp
        from hcformer.ops import hard_clusters
        from hcformer.runfolder import METRICS, write_json_atomic

        started = time.perf_counter()
        cfg, test = self.cfg, self.cfg.test
        ds = build_dataset(cfg.data, "val")
        if len(ds) == 0:
            raise HCFormerError(f"data.root {cfg.data.root}: the validation split has no images")
        check_num_classes(cfg, ds)
        final = model is None
        if final:
            model = self.load_model()
        per_pixel = head_entry(cfg.model.head.type).per_pixel
        task = cfg.data.task
        out_dir = self.run_dir / PREDICTIONS if out_dir is None else Path(out_dir)
        cats = ds.categories
        things = frozenset(c["train_id"] for c in cats if c["isthing"])
        semantic = panoptic = instances = None
        if task == "semantic" or task == "panoptic":
            semantic = SemanticWriter(out_dir / "semantic")
        if task == "panoptic":
            panoptic = PanopticWriter(out_dir / "panoptic", out_dir / "panoptic.json", cats)
        if (task == "panoptic" and ds.instances_json is not None) or task == "instance":
            instances = InstanceWriter(out_dir / "instances_results.json", cats)
        useg: dict[int, list[float]] = {}
        visual_dir = self.run_dir / VISUAL
        n_visual = test.visual_images if final else 0
        batch = max(1, test.batch_size)
        with torch.inference_mode():
            for first in range(0, len(ds), batch):
                if stop is not None and stop():
                    return None
                indices = list(range(first, min(first + batch, len(ds))))
                records = [ds.load(i) for i in indices]
                samples = [test_transform(r, cfg.data) for r in records]
                # Padded with the pixel mean: 0 after the model normalises, as the authors'.
                collated = collate(samples, size_divisibility=32, pad_value=eval_pad_value())
                images = collated["images"].to(self.device)
                padded = tuple(images.shape[-2:])
                outputs = model(images)
                levels = hard_clusters(outputs.get("assignments", []))
                for b, (i, record, meta) in enumerate(zip(indices, records, collated["metas"])):
                    size, orig = tuple(meta["size"]), tuple(meta["orig_size"])
                    image_id, stem = meta["image_id"], meta["stem"]
                    pred_map = None
                    if per_pixel:
                        logits = pp.upsample_to_input(outputs["sem_logits"][b : b + 1], padded)[0]
                        scores = pp.resize_to_original(logits, size, orig)
                        pred_map = scores.argmax(0).to(torch.uint8).cpu().numpy()
                    else:
                        cls = outputs["pred_logits"][b].float()
                        masks = pp.upsample_to_input(
                            outputs["pred_masks"][b : b + 1].float(), padded
                        )[0]
                        if task == "semantic":
                            scores = pp.resize_to_original(
                                pp.semantic_inference(cls, masks), size, orig
                            )
                            pred_map = scores.argmax(0).to(torch.uint8).cpu().numpy()
                        else:
                            masks = pp.resize_to_original(masks, size, orig)
                        if task == "panoptic":
                            sem = (
                                pp.semantic_inference(cls, masks)
                                .argmax(0)
                                .to(torch.uint8)
                                .cpu()
                                .numpy()
                            )
                            semantic.add(stem, sem)
                            seg_map, segments = pp.panoptic_inference(
                                cls,
                                masks,
                                thing_classes=things,
                                object_mask_threshold=test.object_mask_threshold,
                                overlap_threshold=test.overlap_threshold,
                            )
                            seg_np = seg_map.cpu().numpy()
                            panoptic.add(image_id, stem, seg_np, segments)
                            lut = np.full(len(segments) + 1, 255, dtype=np.uint8)
                            for s in segments:
                                lut[s["id"]] = s["category"]
                            pred_map = lut[seg_np]
                        if instances is not None:
                            inst = pp.instance_inference(
                                cls,
                                masks,
                                topk=test.instance_topk,
                                thing_classes=things if task == "panoptic" else None,
                            )
                            instances.add(
                                image_id,
                                inst["scores"].cpu().numpy(),
                                inst["labels"].cpu().numpy(),
                                inst["masks"].cpu().numpy(),
                            )
                    if task == "semantic":
                        semantic.add(stem, pred_map)
                    gt = gt_regions(ds, i, record)
                    cluster_maps = []
                    for level, labels in enumerate(reversed(levels), start=1):
                        full = torch.nn.functional.interpolate(
                            labels[b : b + 1, None].float(), size=padded, mode="nearest"
                        )[0, 0, : size[0], : size[1]]
                        full = full.long().cpu().numpy()
                        useg.setdefault(level, []).append(undersegmentation_error(full, gt))
                        cluster_maps.append((full, padded[0] // labels.shape[-2]))
                    if i < n_visual:
                        save_visual(
                            visual_dir / f"{stem}.npz", record.image, cluster_maps, pred_map, gt
                        )
        closed = {}
        for name, writer in (("panoptic", panoptic), ("instances", instances)):
            if writer is not None:
                closed[name] = writer.close()
        scores = self.score(ds, closed, semantic)
        metrics: dict[str, Any] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        for level, values in sorted(useg.items()):
            metrics[f"useg_level{level}"] = float(np.mean(values))
        metrics["iterations"] = self.iterations
        metrics["images"] = len(ds)
        metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(out_dir / "scores.json", scores.get("_details", {}))
        if final:
            write_json_atomic(self.run_dir / METRICS, metrics)
        return metrics

    def score(self, ds: Any, written: dict[str, Path], semantic: Any) -> dict[str, Any]:
        from hcformer.evaluation import evaluate_instance, evaluate_panoptic, evaluate_semantic

        cfg = self.cfg
        out: dict[str, Any] = {"_details": {}}
        details = out["_details"]
        if cfg.data.task == "panoptic":
            pq = evaluate_panoptic(
                ds.gt_json,
                ds.gt_dir,
                written["panoptic"],
                self.run_dir / PREDICTIONS / "panoptic",
                image_ids=ds.image_ids,
            )
            details["panoptic"] = pq
            for key in ("pq", "pq_th", "pq_st", "sq", "sq_th", "sq_st", "rq", "rq_th", "rq_st"):
                out[key] = pq[key]
            if "instances" in written:
                ap = evaluate_instance(
                    ds.instances_json, written["instances"], image_ids=ds.image_ids
                )
                details["instance"] = ap
                out["ap_th_pan"] = ap["ap"]
            sem = evaluate_semantic(
                ds, ds.gt_dir, semantic.folder, gt_json=ds.gt_json, stems=ds.stems
            )
            details["semantic"] = sem
            out["miou_pan"] = sem["miou"]
        elif cfg.data.task == "instance":
            ap = evaluate_instance(
                ds.gt_json,
                written["instances"],
                boundary=cfg.test.boundary_ap,
                image_ids=ds.image_ids,
            )
            details["instance"] = ap
            for key in ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l"):
                out[key] = ap[key]
            if cfg.test.boundary_ap:
                out["ap_boundary"] = ap["ap_boundary"]
        else:
            sem = evaluate_semantic(ds, ds.gt_dir, semantic.folder, stems=ds.stems)
            details["semantic"] = sem
            out["miou"], out["pixel_acc"] = sem["miou"], sem["pixel_acc"]
        return out


def save_visual(
    path: Path,
    image: np.ndarray,
    cluster_maps: list[tuple[np.ndarray, int]],
    pred: np.ndarray | None,
    gt: np.ndarray,
) -> None:
    """One ``visual/<stem>.npz`` (keys in the module docstring), all at the original size."""
    from hcformer.evaluation.undersegmentation import upsample_nearest

    height, width = image.shape[:2]
    clusters = np.zeros((len(cluster_maps), height, width), dtype=np.int32)
    strides = np.zeros(len(cluster_maps), dtype=np.int32)
    for k, (labels, stride) in enumerate(cluster_maps):
        clusters[k] = upsample_nearest(labels, (height, width))
        strides[k] = stride
    if pred is None:
        pred = np.full((height, width), 255, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(
        tmp,
        image=image.astype(np.uint8),
        clusters=clusters,
        pred=pred.astype(np.uint8),
        gt=gt.astype(np.uint8),
        stride=strides,
    )
    tmp.replace(path)


def evaluate(run_dir: str | Path, *, device: str | None = None, inference=None) -> dict[str, Any]:
    """Evaluate a run folder; returns the metrics also written to ``metrics.json``. Mirrors
    them to MLflow (the run folder's MLflow run ends FINISHED)."""
    from hcformer.config import to_dict
    from hcformer.runfolder import CONFIG, METRICS

    evaluator = Evaluator(Path(run_dir), device=device, inference=inference)
    metrics = evaluator.run()
    if evaluator.cfg.tracking.enabled:
        from hcformer.tracking import open_tracker

        tracker = open_tracker(Path(run_dir), to_dict(evaluator.cfg), evaluator.info)
        tracker.log_metrics(metrics, int(metrics.get("iterations", 0)))
        tracker.log_artifacts([Path(run_dir) / CONFIG, Path(run_dir) / METRICS])
        tracker.end("FINISHED")
    return metrics


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hcformer evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a run folder written by hcformer train")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    from hcformer.models.fuse import add_inference_arguments, inference_options

    add_inference_arguments(p)
    args = p.parse_args(argv)
    metrics = evaluate(args.run_dir, device=args.device, inference=inference_options(args))
    shown = {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)}
    print(f"hcformer evaluate: {args.run_dir}: {json.dumps(shown)}", file=sys.stderr)
    return 0
