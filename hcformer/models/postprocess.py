"""Inference of semantic, panoptic and instance outputs from mask classification (App. A).

As MaskFormer / Mask2Former and the authors' HCFormer: only the final prediction is decoded
(HCFormer: through its L clustering modules, to stride 32 / 2**L); its masks are resized ONCE,
bilinearly (``align_corners=False``), from that stride to the padded input
(:func:`upsample_to_input`), cropped to the image, and resized to the original size
(:func:`resize_to_original`); then

- semantic: ``einsum("qc,qhw->chw", softmax(class)[..., :-1], sigmoid(mask))``;
- panoptic: keep queries whose class is not "no object" with probability above
  ``object_mask_threshold`` (0.8); each pixel goes to the kept query of highest
  ``p * sigmoid(mask)``; a query's segment (its pixels with ``sigmoid(mask) >= 0.5``) is dropped
  when it keeps less than ``overlap_threshold`` (0.8) of its own mask; stuff segments of one
  class are merged;
- instance: top-``k`` (100) (query, class) pairs over all Q x K class probabilities; mask =
  ``logit > 0``; score = class probability x mean mask probability inside the mask.

Pure tensor functions (torch only): ``hcformer profile`` counts their FLOPs with the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_to_input(masks: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Mask logits ``[B, Q, h, w]`` at any stride -> ``[B, Q, H, W]`` at the padded input size,
    in one bilinear resize (``align_corners=False``)."""
    return F.interpolate(masks, size=padded_size, mode="bilinear", align_corners=False)


def resize_to_original(
    x: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]
) -> Tensor:
    """Crop ``x`` ``[C, H_pad, W_pad]`` to the unpadded ``image_size``, then resize it
    bilinearly to ``output_size`` (the original image)."""
    x = x[:, : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) == tuple(output_size):
        return x
    return F.interpolate(x[None], size=output_size, mode="bilinear", align_corners=False)[0]


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class scores ``[K, H, W]`` of one image.

    Arguments:
      class_logits: ``[Q, K+1]`` (the last column is "no object").
      mask_logits: ``[Q, H, W]``.
    """
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_logits.sigmoid())


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    thing_classes: set[int] | frozenset[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[dict]]:
    """Panoptic segmentation of one image.

    Arguments:
      class_logits: ``[Q, K+1]``; mask_logits: ``[Q, H, W]``.
      thing_classes: the contiguous class indices that are things (others are stuff).
      object_mask_threshold: minimum class probability of a kept query (0.8).
      overlap_threshold: minimum fraction of its own mask a segment keeps (0.8).

    Returns the ``[H, W]`` int32 segment-id map (0 = no segment) and, per segment,
    ``{"id", "category": contiguous class, "isthing", "score", "area"}``.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    probs = mask_logits.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], probs[keep]
    height, width = mask_logits.shape[-2:]
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    owner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        category = int(cur_classes[k])
        isthing = category in thing_classes
        owned = owner == k
        original = cur_masks[k] >= 0.5
        mask = owned & original
        mask_area, original_area = int(owned.sum()), int(original.sum())
        if mask_area == 0 or original_area == 0 or int(mask.sum()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and category in stuff_ids:
            panoptic[mask] = stuff_ids[category]  # merge stuff of one class into one segment
            segments[stuff_ids[category] - 1]["area"] += int(mask.sum())
            continue
        next_id += 1
        if not isthing:
            stuff_ids[category] = next_id
        panoptic[mask] = next_id
        segments.append(
            {
                "id": next_id,
                "category": category,
                "isthing": isthing,
                "score": float(cur_scores[k]),
                "area": int(mask.sum()),
            }
        )
    return panoptic, segments


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    topk: int = 100,
    thing_classes: set[int] | frozenset[int] | None = None,
) -> dict[str, Tensor]:
    """Instance segmentation of one image.

    Arguments:
      class_logits: ``[Q, K+1]``; mask_logits: ``[Q, H, W]``.
      topk: (query, class) pairs kept over all Q x K probabilities (100).
      thing_classes: if given (a panoptic model), only pairs of these classes are returned.

    Returns ``{"scores": [k], "labels": [k], "masks": bool [k, H, W]}``, where
    score = class probability x mean mask probability inside ``logit > 0``.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.softmax(-1)[:, :-1]
    k = min(topk, probs.numel())
    top_scores, top_index = probs.flatten().topk(k, sorted=False)
    labels = top_index % num_classes
    queries = top_index // num_classes
    if thing_classes is not None:
        keep = torch.tensor(
            [int(c) in thing_classes for c in labels.tolist()],
            dtype=torch.bool,
            device=labels.device,
        )
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
    logits = mask_logits[queries]
    masks = logits > 0
    inside = masks.flatten(1).float()
    mask_score = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return {"scores": top_scores * mask_score, "labels": labels, "masks": masks}
