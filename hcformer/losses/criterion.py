"""The training loss of HCFormer (Sec. 4.1) and of the per-pixel baselines (App. E.1).

Mask classification (HCFormer, HCFormer+, MaskFormer), as Mask2Former's criterion, which the
authors' code uses: every prediction set (the final one and, with deep supervision, each earlier
decoder layer's, equally weighted) is matched to the targets with :class:`HungarianMatcher`; then

- class: cross-entropy over K+1 classes, "no object" weighted ``no_object_weight`` (0.1), as a
  weighted mean over all queries (weight 2.0);
- mask: binary cross-entropy (5.0) and dice (5.0) of the matched masks on importance-sampled
  points of the predicted logits at the stride the model outputs them (HCFormer: 32 / 2**L, as
  the authors' loss reads the masks decoded through the L clustering modules; MaskFormer: 4),
  the targets sampled at the same normalised points of the full-resolution masks, summed over
  masks and divided by the number of target masks;
- the regulariser ``reg_weight * |sum_i s(i)|`` on the clustering modules' scales, added once.
  The paper writes L_reg = sum_i |s(i)|; the authors' code takes the absolute value of the sum
  of the modules' scales: we follow the code. The two agree while every s(i) is positive.

Per-pixel models: cross-entropy (ignore 255) of ``sem_logits`` bilinearly upsampled to the label
size, averaged over labelled pixels, plus the same regulariser.

Normalisers are global: :class:`LossNorm` carries the totals over the whole global batch (every
micro-batch of gradient accumulation and every DDP process), so that each process returns its
share of the global loss and the sum over shares equals the loss of one process holding the
whole batch. Without a ``norm`` the local batch is the global batch (Mask2Former's behaviour on
one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hcformer.losses.matcher import HungarianMatcher
from hcformer.losses.point_sampling import (
    importance_draws,
    importance_points,
    point_sample,
    point_sample_rows,
)

PER_PIXEL_HEADS = ("fcn32s", "fpn", "pspnet", "deeplabv3")


@dataclass(frozen=True)
class LossNorm:
    """Totals over the global batch that normalise the loss terms.

    Arguments:
      num_images: images in the global batch (the regulariser is added once per global batch).
      num_masks: target masks (mask BCE and dice are divided by it; at least 1).
      class_weight_sum: sum of the cross-entropy weights of all queries (1 for a query matched to
        a target, ``no_object_weight`` otherwise): the weighted-mean denominator of the class loss.
      num_pixels: labelled pixels (per-pixel cross-entropy; at least 1).
    """

    num_images: float
    num_masks: float
    class_weight_sum: float
    num_pixels: float

    def as_tensor(self) -> Tensor:
        return torch.tensor(
            [self.num_images, self.num_masks, self.class_weight_sum, self.num_pixels],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, t: Tensor) -> LossNorm:
        values = [float(v) for v in t.tolist()]
        return cls(values[0], max(values[1], 1.0), values[2], max(values[3], 1.0))


def local_norm(
    targets: list[dict[str, Tensor]], *, num_queries: int, no_object_weight: float
) -> LossNorm:
    """The :class:`LossNorm` counts of a list of targets (sum them over the global batch)."""
    masks = 0.0
    weight_sum = 0.0
    pixels = 0.0
    for t in targets:
        n = int(t["labels"].numel()) if "labels" in t else 0
        matched = min(n, num_queries)
        masks += n
        weight_sum += matched + (num_queries - matched) * no_object_weight
        if "sem_seg" in t:
            pixels += float((t["sem_seg"] != 255).sum())
    return LossNorm(float(len(targets)), masks, weight_sum, pixels)


class Matched(NamedTuple):
    """The matched masks of one prediction set, as the mask loss reads them."""

    rows: Tensor  # their rows of the set's masks: [N, H, W] logits or [N, C] coefficients
    images: Tensor  # [N] the image of each
    target_ids: Tensor  # [N] the row of each one's target in the batch's target stack
    draws: tuple[Tensor, Tensor]  # the random part of their point sampling (importance_draws)


def regulariser(cluster_scales: list[Tensor], weight: float) -> Tensor | None:
    """``weight * |sum_i s(i)|`` (the authors' code; the paper writes sum_i |s(i)|)."""
    if not cluster_scales or weight == 0:
        return None
    return weight * torch.stack([s.reshape(()) for s in cluster_scales]).sum().abs()


class SetCriterion(nn.Module):
    """Matching-based loss of a mask-classification model, with deep supervision.

    Arguments:
      num_classes: K (the logits have K+1 columns, the last is "no object").
      matcher: the Hungarian matcher.
      class_weight, mask_weight, dice_weight: loss weights (2, 5, 5).
      no_object_weight: cross-entropy weight of the "no object" class (0.1).
      reg_weight: weight of the |sum s| regulariser (0.1).
      num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask loss.
      deep_supervision: also supervise ``aux_outputs``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float,
        mask_weight: float,
        dice_weight: float,
        no_object_weight: float,
        reg_weight: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.reg_weight = reg_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def norm_for(self, targets: list[dict[str, Tensor]], num_queries: int) -> LossNorm:
        return local_norm(targets, num_queries=num_queries, no_object_weight=self.no_object_weight)

    def _class_loss(
        self, logits: Tensor, targets: list[dict[str, Tensor]], indices, norm: LossNorm
    ) -> Tensor:
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt.to(logits.device)]
        ce = F.cross_entropy(
            logits.float().transpose(1, 2),
            target_classes,
            weight=self.empty_weight.to(logits.device),
            reduction="sum",
        )
        return ce / norm.class_weight_sum

    def _matched_masks(
        self,
        masks: Tensor,
        targets: list[dict[str, Tensor]],
        indices,
        generators: list[torch.Generator],
    ) -> Matched | None:
        """The matched masks of one prediction set (``None`` without targets); each image's
        random draws come from its own generator."""
        # All images at once (indexing image by image would make backward write a zero tensor
        # of the whole batch per image).
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        if batch_idx.numel() == 0:
            return None
        batch_idx = batch_idx.to(masks.device)
        src_rows = masks[batch_idx, torch.cat([src for src, _ in indices]).to(masks.device)]
        # Each matched target's row in the batch's stack of target masks (``forward``).
        target_ids = torch.cat(
            [targets[b]["first"] + tgt.to(masks.device) for b, (_, tgt) in enumerate(indices)]
        )
        draws = [
            importance_draws(
                len(src),
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                generator=generators[b],
                device=masks.device,
            )
            for b, (src, _) in enumerate(indices)
        ]
        candidates = torch.cat([c for c, _ in draws])
        return Matched(
            src_rows, batch_idx, target_ids, (candidates, torch.cat([e for _, e in draws]))
        )

    def _mask_losses(
        self,
        matched: list[Matched],
        target_stack: Tensor,
        norm: LossNorm,
        mask_basis: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """BCE and dice of each set in ``matched`` (``[sets]`` each), on importance-sampled
        points; the sets are sampled and scored in one pass. With ``mask_basis`` the matched
        rows are coefficients over it, and only the matched masks are ever formed."""
        rows = torch.cat([m.rows for m in matched])
        if mask_basis is None:
            src_masks = rows[:, None].float()
        else:
            images = torch.cat([m.images for m in matched])
            src_masks = masks_over_basis(rows, images, mask_basis)[:, None]
        target_ids = torch.cat([m.target_ids for m in matched])
        draws = (
            torch.cat([m.draws[0] for m in matched]),
            torch.cat([m.draws[1] for m in matched]),
        )
        coords = importance_points(src_masks.detach(), draws, num_points=self.num_points)
        with torch.no_grad():
            labels_t = point_sample_rows(target_stack, target_ids, coords)[:, 0]
        logits_t = point_sample(src_masks, coords)[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits_t, labels_t, reduction="none").mean(1)
        probs = logits_t.sigmoid()
        numerator = 2 * (probs * labels_t).sum(-1)
        denominator = probs.sum(-1) + labels_t.sum(-1)
        dice = 1 - (numerator + 1) / (denominator + 1)
        # Per set: the masks of set i are the i-th block of rows.
        set_index = torch.cat(
            [torch.full((len(m.rows),), i, device=rows.device) for i, m in enumerate(matched)]
        )
        per_set = torch.zeros(2, len(matched), device=rows.device, dtype=bce.dtype)
        per_set = per_set.index_add(1, set_index, torch.stack([bce, dice]))
        return per_set[0] / norm.num_masks, per_set[1] / norm.num_masks

    def forward(
        self,
        outputs: dict,
        targets: list[dict[str, Tensor]],
        *,
        generators: list[torch.Generator],
        norm: LossNorm | None = None,
    ) -> dict[str, Tensor]:
        """Weighted loss terms: ``loss_ce``, ``loss_mask``, ``loss_dice`` of the final set,
        ``loss_ce_<i>`` etc. of the earlier set i, and ``loss_reg``; their sum is the loss.

        Arguments:
          outputs: the model's dict (``pred_logits``, ``pred_masks``, ``aux_outputs``,
            ``cluster_scales``); a set may instead hold ``mask_coefficients`` [B, Q, C] over
            ``mask_basis`` [B, C, H, W] (HCFormer's training sets of a small coarse map): the
            same logits, sampled without forming every query's map.
          targets: per image ``{"labels": [N], "masks": [N, H, W]}`` at the padded input size.
          generators: one per image, the source of its point samples.
          norm: totals over the global batch (default: this batch alone).
        """
        num_queries = outputs["pred_logits"].shape[1]
        if norm is None:
            norm = self.norm_for(targets, num_queries)
        # Float target masks once for all prediction sets (matcher and mask loss sample them):
        # one stack [T, 1, H, W]; each image's masks are a view of it, from row "first".
        counts = [len(t["masks"]) for t in targets]
        target_stack = torch.cat([t["masks"] for t in targets]).float()[:, None]
        firsts = list(accumulate(counts[:-1], initial=0))
        targets = [
            dict(t, masks=target_stack[f : f + n, 0], first=f)
            for t, f, n in zip(targets, firsts, counts, strict=True)
        ]
        sets = [("", outputs)]
        if self.deep_supervision:
            sets += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        mask_basis = _shared_basis(sets)
        mask_key = "pred_masks" if mask_basis is None else "mask_coefficients"
        class_losses, matched = [], []  # matched: per set, its matched masks (scored together)
        for _, pred in sets:
            masks = pred[mask_key]
            indices = self.matcher(
                pred["pred_logits"], masks, targets, generators, mask_basis=mask_basis
            )
            class_losses.append(self._class_loss(pred["pred_logits"], targets, indices, norm))
            matched.append(self._matched_masks(masks, targets, indices, generators))
        if matched[0] is None:  # no targets in the batch: every set is empty
            # Zero terms that still reach every mask parameter (DDP expects their gradients).
            zero = 0.0 if mask_basis is None else mask_basis.sum() * 0.0
            bce = dice = torch.stack([pred[mask_key].sum() * 0.0 + zero for _, pred in sets])
        else:
            bce, dice = self._mask_losses(matched, target_stack, norm, mask_basis)
        losses: dict[str, Tensor] = {}
        for i, (suffix, _) in enumerate(sets):
            losses["loss_ce" + suffix] = self.class_weight * class_losses[i]
            losses["loss_mask" + suffix] = self.mask_weight * bce[i]
            losses["loss_dice" + suffix] = self.dice_weight * dice[i]
        reg = regulariser(outputs.get("cluster_scales", []), self.reg_weight)
        if reg is not None:
            losses["loss_reg"] = reg * (len(targets) / norm.num_images)
        return losses


def _shared_basis(sets: list[tuple[str, dict]]) -> Tensor | None:
    """The ``mask_basis`` of the prediction sets (None when they hold dense ``pred_masks``);
    every set must hold its masks the same way, over the same basis."""
    basis = sets[0][1].get("mask_basis")
    for _, pred in sets:
        if pred.get("mask_basis") is not basis or ("pred_masks" in pred) != (basis is None):
            raise ValueError(
                "SetCriterion: every prediction set must hold either pred_masks or "
                "mask_coefficients over one shared mask_basis"
            )
    return basis


def masks_over_basis(coefficients: Tensor, images: Tensor, basis: Tensor) -> Tensor:
    """Row n's mask logits ``coefficients[n] @ basis[images[n]]``: ``[N, C]`` coefficients, the
    ``[N]`` image of each row and a ``[B, C, H, W]`` basis -> ``[N, H, W]`` (float32), one
    product per image."""
    flat = basis.float().flatten(2)
    order = torch.argsort(images, stable=True)
    counts = torch.bincount(images, minlength=basis.shape[0]).tolist()
    parts = [c @ flat[b] for b, c in enumerate(coefficients.float()[order].split(counts))]
    return torch.cat(parts)[torch.argsort(order)].unflatten(-1, basis.shape[-2:])


class PerPixelCriterion(nn.Module):
    """Cross-entropy of a per-pixel model (ignore 255) plus the |sum s| regulariser.

    Arguments:
      reg_weight: weight of the regulariser (HC versions have clustering modules).
    """

    def __init__(self, *, reg_weight: float) -> None:
        super().__init__()
        self.reg_weight = reg_weight

    def norm_for(self, targets: list[dict[str, Tensor]], num_queries: int = 0) -> LossNorm:
        return local_norm(targets, num_queries=0, no_object_weight=0.0)

    def forward(
        self,
        outputs: dict,
        targets: list[dict[str, Tensor]],
        *,
        generators: list[torch.Generator] | None = None,
        norm: LossNorm | None = None,
    ) -> dict[str, Tensor]:
        """``loss_sem`` (and ``loss_reg``); targets are ``{"sem_seg": [H, W]}`` per image."""
        if norm is None:
            norm = self.norm_for(targets)
        labels = torch.stack([t["sem_seg"] for t in targets]).to(outputs["sem_logits"].device)
        logits = F.interpolate(
            outputs["sem_logits"].float(),
            size=labels.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
        losses = {"loss_sem": ce / norm.num_pixels}
        reg = regulariser(outputs.get("cluster_scales", []), self.reg_weight)
        if reg is not None:
            losses["loss_reg"] = reg * (len(targets) / norm.num_images)
        return losses


def summarize(losses: dict[str, Tensor]) -> dict[str, float]:
    """Loss terms summed over prediction sets: ``{"loss_ce": ..., "loss_mask": ..., "loss": total}``."""
    out: dict[str, float] = {}
    for key, value in losses.items():
        head, _, tail = key.rpartition("_")
        term = head if tail.isdigit() else key
        out[term] = out.get(term, 0.0) + float(value.detach())
    out["loss"] = sum(float(v.detach()) for v in losses.values())
    return out
