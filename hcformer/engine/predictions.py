"""The post-processed prediction of one validation image, computed on first use (App. A).

:class:`ImagePredictions` is what the metrics of :mod:`hcformer.evaluation.metrics` read
(their ``Prediction``): numpy arrays at the image's original size, each made the first time a
metric asks for it, so a task pays only for the inferences its metrics use. Post-processing as
MaskFormer and the authors' code (:mod:`hcformer.models.postprocess`): the final prediction's
masks at the model's output stride are resized once, bilinearly, to the padded input, then

- on the semantic task, the semantic inference runs at the padded size and its class scores
  are cropped and resized to the original image;
- on the panoptic and instance tasks, the masks are cropped and resized to the original image
  first and every inference (semantic view, panoptic, instance) runs on them (the authors'
  ``sem_seg_postprocess_before_inference``, on whenever panoptic or instance inference is);
- a per-pixel model's class logits are resized the same way as the semantic scores;
- the panoptic task's instance inference keeps thing classes only.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hcformer.models import postprocess as pp


class ImagePredictions:
    """Image ``b`` of a batch's model ``outputs`` (see the module docstring).

    Arguments:
      outputs: the model's outputs for the batch (``sem_logits``, or ``pred_logits`` and
        ``pred_masks``).
      levels: :func:`hcformer.ops.hard_clusters` of the batch's assignments (finest first).
      b: the image's index in the batch.
      padded: the batch's padded input size.
      meta: the image's ``meta`` of the collated batch (``size``: resized, ``orig_size``).
      task: ``semantic``, ``panoptic`` or ``instance``.
      per_pixel: whether the model is a per-pixel one (``sem_logits``).
      thing_classes: the train ids of the thing classes.
      test: the run's ``TestConfig`` (thresholds, top-k).
    """

    def __init__(
        self,
        outputs: dict[str, Any],
        levels: list[Tensor],
        b: int,
        padded: tuple[int, int],
        meta: dict[str, Any],
        *,
        task: str,
        per_pixel: bool,
        thing_classes: frozenset[int],
        test: Any,
    ) -> None:
        self.outputs, self.levels, self.b, self.padded = outputs, levels, b, padded
        self.size, self.orig = tuple(meta["size"]), tuple(meta["orig_size"])
        self.task, self.per_pixel = task, per_pixel
        self.thing_classes, self.test = thing_classes, test

    @cached_property
    def _class_logits(self) -> Tensor:
        return self.outputs["pred_logits"][self.b].float()

    @cached_property
    def _padded_masks(self) -> Tensor:
        b = self.b
        return pp.upsample_to_input(self.outputs["pred_masks"][b : b + 1].float(), self.padded)[0]

    @cached_property
    def _masks(self) -> Tensor:
        """The mask logits at the original size (panoptic and instance tasks)."""
        return pp.resize_to_original(self._padded_masks, self.size, self.orig)

    @cached_property
    def semantic(self) -> np.ndarray:
        """uint8 ``[H, W]``: the class of highest score of each pixel."""
        if self.per_pixel:
            b = self.b
            logits = pp.upsample_to_input(self.outputs["sem_logits"][b : b + 1], self.padded)[0]
            scores = pp.resize_to_original(logits, self.size, self.orig)
        elif self.task == "semantic":
            scores = pp.semantic_inference(self._class_logits, self._padded_masks)
            scores = pp.resize_to_original(scores, self.size, self.orig)
        else:
            scores = pp.semantic_inference(self._class_logits, self._masks)
        return scores.argmax(0).to(torch.uint8).cpu().numpy()

    @cached_property
    def panoptic(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The segment-id map (0 = no segment) and its segments."""
        segment_map, segments = pp.panoptic_inference(
            self._class_logits,
            self._masks,
            thing_classes=self.thing_classes,
            object_mask_threshold=self.test.object_mask_threshold,
            overlap_threshold=self.test.overlap_threshold,
        )
        return segment_map.cpu().numpy(), segments

    @cached_property
    def instances(self) -> dict[str, np.ndarray]:
        """``scores``, ``labels``, ``masks`` of the top ``test.instance_topk`` instances."""
        inst = pp.instance_inference(
            self._class_logits,
            self._masks,
            topk=self.test.instance_topk,
            thing_classes=self.thing_classes if self.task == "panoptic" else None,
        )
        return {key: value.cpu().numpy() for key, value in inst.items()}

    @cached_property
    def class_map(self) -> np.ndarray | None:
        """The class of each pixel for the Fig. 5 view: the semantic prediction, on the panoptic
        task the category of the pixel's segment (255 = none); None on the instance task."""
        if self.per_pixel or self.task == "semantic":
            return self.semantic
        if self.task != "panoptic":
            return None
        segment_map, segments = self.panoptic
        lut = np.full(len(segments) + 1, 255, dtype=np.uint8)
        for s in segments:
            lut[s["id"]] = s["category"]
        return lut[segment_map]

    @cached_property
    def clusters(self) -> list[tuple[np.ndarray, int]]:
        """Each level's hard cluster map, level 1 (coarsest) first: nearest-upsampled to the
        padded input and cropped to the resized image, with the stride of the level's map."""
        maps = []
        b = self.b
        for labels in reversed(self.levels):
            full = torch.nn.functional.interpolate(
                labels[b : b + 1, None].float(), size=self.padded, mode="nearest"
            )[0, 0, : self.size[0], : self.size[1]]
            maps.append((full.long().cpu().numpy(), self.padded[0] // labels.shape[-2]))
        return maps
