"""Scoring a trained run folder: :func:`evaluate` ``(run_dir)`` writes ``metrics.json``.

``hcformer evaluate --run-dir DIR`` (:mod:`hcformer.commands.evaluate`) and the launchers' jobs
call it. Loads ``model_final.pt``, runs the model on the validation split (test-time resize of the config,
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

Fast paths, evaluation only (``inference``: the command's ``--fuse --channels-last --dtype
bfloat16 --compile [MODE] --cuda-graph``): :func:`hcformer.models.fuse.optimize_for_inference` on
the loaded model; without them the plain model runs.

``metrics.json`` is written atomically and last: its presence means the run is complete. Scores
broken down per class go to ``predictions/scores.json``.

Fig. 5-style data: for the first ``test.visual_images`` val images, ``DIR/visual/<stem>.npz``
(the image, each level's hard clusters, the predicted and ground-truth classes:
:mod:`hcformer.evaluation.formats`).

The metrics of a task are objects (:mod:`hcformer.evaluation.metrics`, listed per task in
:data:`hcformer.evaluation.tasks.TASK_METRICS`): :meth:`Evaluator.run` post-processes each image
(:class:`hcformer.engine.predictions.ImagePredictions`), hands it to every metric's ``add`` and
merges their ``finish()`` into ``metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hcformer.config import to_dict
from hcformer.data import build_dataset, collate, test_transform
from hcformer.engine.batches import eval_pad_value
from hcformer.engine.checkpoint import load_checkpoint
from hcformer.engine.predictions import ImagePredictions
from hcformer.engine.runinfo import check_num_classes, read_run
from hcformer.errors import HCFormerError
from hcformer.evaluation.metrics import EvalContext, ImageTarget
from hcformer.evaluation.tasks import build_metrics
from hcformer.families import head_entry
from hcformer.models import build_model
from hcformer.ops import hard_clusters
from hcformer.runfolder import (
    CONFIG,
    FINAL_WEIGHTS,
    METRICS,
    PREDICTIONS,
    SCORES,
    VISUAL,
    write_json_atomic,
)
from hcformer.tracking import open_tracker


class Evaluator:
    """Inference over the validation split of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, *, device: str | None = None, inference=None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg, self.info = read_run(self.run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.inference = inference  # hcformer.models.fuse.InferenceOptions; None: the plain model

    def load_model(self):
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
        # Imported here: hcformer.models.fuse loads triton (about 1 s), needed only for fast paths.
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
        started = time.perf_counter()
        cfg, test = self.cfg, self.cfg.test
        ds = build_dataset(cfg.data, "val")
        if len(ds) == 0:
            raise HCFormerError(f"data.root {cfg.data.root}: the validation split has no images")
        check_num_classes(cfg, ds)
        final = model is None
        if final:
            model = self.load_model()
        out_dir = self.run_dir / PREDICTIONS if out_dir is None else Path(out_dir)
        ctx = EvalContext(ds, out_dir, test, self.run_dir / VISUAL if final else None)
        metrics = build_metrics(ds.task, ctx)
        post = {
            "task": ds.task,
            "per_pixel": head_entry(cfg.model.head.type).per_pixel,
            "thing_classes": frozenset(c["train_id"] for c in ds.categories if c["isthing"]),
            "test": test,
        }
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
                    pred = ImagePredictions(outputs, levels, b, padded, meta, **post)
                    target = ImageTarget(i, record, meta["image_id"], meta["stem"])
                    for metric in metrics:
                        metric.add(pred, target)
        scores: dict[str, Any] = {}
        details: dict[str, Any] = {}
        for metric in metrics:
            scores.update(metric.finish())
            details.update(metric.details)
        scores["iterations"] = self.iterations
        scores["images"] = len(ds)
        scores["eval_seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(out_dir / SCORES, details)
        if final:
            write_json_atomic(self.run_dir / METRICS, scores)
        return scores


def evaluate(run_dir: str | Path, *, device: str | None = None, inference=None) -> dict[str, Any]:
    """Evaluate a run folder; returns the metrics also written to ``metrics.json`` (and, rounded,
    in one line on stderr: what a job's log shows). Mirrors them to MLflow (the run folder's
    MLflow run ends FINISHED). ``inference``: the fast paths
    (:class:`hcformer.models.fuse.InferenceOptions`; None: the plain model)."""
    evaluator = Evaluator(Path(run_dir), device=device, inference=inference)
    metrics = evaluator.run()
    shown = {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)}
    print(f"hcformer evaluate: {run_dir}: {json.dumps(shown)}", file=sys.stderr)
    if evaluator.cfg.tracking.enabled:
        tracker = open_tracker(Path(run_dir), to_dict(evaluator.cfg), evaluator.info)
        tracker.log_metrics(metrics, int(metrics.get("iterations", 0)))
        tracker.log_artifacts([Path(run_dir) / CONFIG, Path(run_dir) / METRICS])
        tracker.end("FINISHED")
    return metrics
