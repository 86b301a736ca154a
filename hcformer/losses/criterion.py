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

A step waits for the device once: every random draw comes first (per image, set after set: the
matcher's points, then the importance-sampling draws of its ``min(N, Q)`` matched masks, whose
number is known before matching), the costs of every set and image are computed in one batch on
the device and copied to the host in one transfer for scipy, the matches go back in one copy, and
the losses of every set are computed in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from hcformer.losses.matcher import HungarianMatcher, assign, costs_to_host, sample_targets
from hcformer.losses.point_sampling import (
    importance_draws,
    importance_points,
    point_sample,
    point_sample_rows,
    row_slots,
)


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

    @classmethod
    def total(cls, norms: list[LossNorm]) -> LossNorm:
        """The sum of ``norms`` (as :meth:`from_tensor` of the sum of their tensors), on the
        host."""
        values = [0.0] * 4
        for n in norms:
            fields = (n.num_images, n.num_masks, n.class_weight_sum, n.num_pixels)
            values = [v + f for v, f in zip(values, fields, strict=True)]
        return cls(values[0], max(values[1], 1.0), values[2], max(values[3], 1.0))


def local_norm(
    targets: list[dict[str, Tensor]],
    *,
    num_queries: int,
    no_object_weight: float,
    count_pixels: bool = True,
) -> LossNorm:
    """The :class:`LossNorm` counts of a list of targets (sum them over the global batch);
    without ``count_pixels`` (the mask losses do not use it) the pixel count is 0 and only the
    targets' shapes are read."""
    masks = 0.0
    weight_sum = 0.0
    pixels = 0.0
    for t in targets:
        n = int(t["labels"].numel()) if "labels" in t else 0
        matched = min(n, num_queries)
        masks += n
        weight_sum += matched + (num_queries - matched) * no_object_weight
        if count_pixels and "sem_seg" in t:
            pixels += float((t["sem_seg"] != 255).sum())
    return LossNorm(float(len(targets)), masks, weight_sum, pixels)


class Assignment(NamedTuple):
    """Every prediction set's matches, as the losses read them: one row per matched query, set
    after set and image after image within a set (device tensors from ONE host-to-device copy;
    the counts stay on the host)."""

    class_pos: Tensor  # [M] flat position (set, image, query) of each matched query
    images: Tensor  # [M] its image
    queries: Tensor  # [M] its query
    target_ids: Tensor  # [M] the row of its target in the batch's target stack
    set_index: Tensor  # [M] its prediction set
    by_image: Tensor  # [M] the rows in image order (stable), for masks_over_basis
    unsort: Tensor  # [M] the inverse of by_image
    slot: Tensor  # [M] point_sample_rows' slot of each row among the rows of its target
    max_rows: int  # the most rows of one target
    per_set: list[int]  # rows of each set
    per_image: list[int]  # rows of each image over all sets


def host_assignment(
    indices: list[list[tuple[np.ndarray, np.ndarray]]],
    firsts: list[int],
    num_queries: int,
    device,
) -> Assignment:
    """The :class:`Assignment` of :func:`~hcformer.losses.matcher.assign`'s host indices, sent
    to ``device`` in one copy."""
    num_images = len(firsts)
    images, queries, target_ids, set_index = [], [], [], []
    for s, per_set in enumerate(indices):
        for b, (src, tgt) in enumerate(per_set):
            images.append(np.full(len(src), b, dtype=np.int64))
            queries.append(src)
            target_ids.append(firsts[b] + tgt)
            set_index.append(np.full(len(src), s, dtype=np.int64))
    images_np, queries_np, targets_np, sets_np = (
        np.concatenate(x).astype(np.int64) for x in (images, queries, target_ids, set_index)
    )
    class_pos = (sets_np * num_images + images_np) * num_queries + queries_np
    by_image = np.argsort(images_np, kind="stable")
    slot, max_rows = row_slots(targets_np)
    host = torch.from_numpy(
        np.stack(
            [
                class_pos,
                images_np,
                queries_np,
                targets_np,
                sets_np,
                by_image,
                np.argsort(by_image),
                slot,
            ]
        )
    )
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    return Assignment(
        *on_device.unbind(0),
        max_rows=max_rows,
        per_set=[sum(len(src) for src, _ in per_set) for per_set in indices],
        per_image=np.bincount(images_np, minlength=num_images).tolist(),
    )


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
        # Called with "matching" when the matches are on the device (the benchmark's clock).
        self.phase_mark: Callable[[str], None] | None = None

    def norm_for(self, targets: list[dict[str, Tensor]], num_queries: int) -> LossNorm:
        return local_norm(
            targets,
            num_queries=num_queries,
            no_object_weight=self.no_object_weight,
            count_pixels=False,
        )

    def _draws(
        self,
        num_sets: int,
        counts: list[int],
        num_queries: int,
        generators: list[torch.Generator],
        device,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Every random draw of a step, up front, in the order the sets are scored: per set,
        each image with targets draws its matcher points, then the importance-sampling
        candidates and extras of its ``min(N, Q)`` matched masks (their number is known before
        matching). Returns the matcher points ``[S, B, P, 2]`` and the loss draws of every
        matched mask, set after set, image after image."""
        coords, candidates, extras = [], [], []
        for _ in range(num_sets):
            coords.append(self.matcher.draw_points(counts, generators, device))
            for b, n in enumerate(counts):
                c, e = importance_draws(
                    min(n, num_queries),
                    num_points=self.num_points,
                    oversample_ratio=self.oversample_ratio,
                    importance_sample_ratio=self.importance_sample_ratio,
                    generator=generators[b],
                    device=device,
                )
                candidates.append(c)
                extras.append(e)
        return torch.stack(coords), (torch.cat(candidates), torch.cat(extras))

    def _class_losses(
        self, logits: Tensor, labels: Tensor, assignment: Assignment | None, norm: LossNorm
    ) -> Tensor:
        """``[S]`` class losses of the ``[S, B, Q, K+1]`` logits: matched queries take their
        target's class (``labels``: the batch's ``[T]`` target classes), the others "no
        object"."""
        s, b, q, _ = logits.shape
        target_classes = torch.full(
            (s * b * q,), self.num_classes, dtype=torch.int64, device=logits.device
        )
        if assignment is not None:
            target_classes[assignment.class_pos] = labels[assignment.target_ids]
        ce = F.cross_entropy(
            logits.flatten(0, 1).transpose(1, 2),
            target_classes.view(s * b, q),
            weight=self.empty_weight.to(logits.device),
            reduction="none",
        )  # [S * B, Q]
        return ce.view(s, b * q).sum(1) / norm.class_weight_sum

    def _mask_losses(
        self,
        masks: list[Tensor],
        assignment: Assignment,
        draws: tuple[Tensor, Tensor],
        target_stack: Tensor,
        norm: LossNorm,
        mask_basis: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """BCE and dice of each set (``[S]`` each) on importance-sampled points of its matched
        masks; the sets are sampled and scored in one pass. With ``mask_basis`` the sets'
        masks are coefficients over it, and only the matched masks are ever formed."""
        images = assignment.images.split(assignment.per_set)
        queries = assignment.queries.split(assignment.per_set)
        # All images of a set at once (indexing image by image would make backward write a
        # zero tensor of the whole batch per image).
        rows = torch.cat(
            [m[i, q] for m, i, q in zip(masks, images, queries, strict=True)]
        )  # [M, h, w] logits or [M, C] coefficients
        if mask_basis is None:
            src_masks = rows[:, None].float()
        else:
            src_masks = masks_over_basis(
                rows,
                mask_basis,
                order=(assignment.by_image, assignment.unsort),
                counts=assignment.per_image,
            )[:, None]
        coords = importance_points(src_masks.detach(), draws, num_points=self.num_points)
        with torch.no_grad():
            labels_t = point_sample_rows(
                target_stack,
                assignment.target_ids,
                coords,
                slots=(assignment.slot, assignment.max_rows),
            )[:, 0]
        logits_t = point_sample(src_masks, coords)[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits_t, labels_t, reduction="none").mean(1)
        probs = logits_t.sigmoid()
        numerator = 2 * (probs * labels_t).sum(-1)
        denominator = probs.sum(-1) + labels_t.sum(-1)
        dice = 1 - (numerator + 1) / (denominator + 1)
        per_set = torch.zeros(2, len(masks), device=rows.device, dtype=bce.dtype)
        per_set = per_set.index_add(1, assignment.set_index, torch.stack([bce, dice]))
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

        The one wait for the device: every set's matching costs come to the host in one copy
        (:func:`~hcformer.losses.matcher.assign`), and the matches go back in one copy.
        """
        num_queries = outputs["pred_logits"].shape[1]
        if norm is None:
            norm = self.norm_for(targets, num_queries)
        device = outputs["pred_logits"].device
        # Float target masks once for all prediction sets (matcher and mask loss sample them):
        # one stack [T, 1, H, W], image after image from row firsts[b].
        counts = [int(t["labels"].shape[0]) for t in targets]
        target_stack = torch.cat([t["masks"] for t in targets]).float()[:, None]
        firsts = list(accumulate(counts[:-1], initial=0))
        sets = [outputs]
        if self.deep_supervision:
            sets += list(outputs.get("aux_outputs", []))
        mask_basis = _shared_basis(sets)
        masks = [pred["pred_masks" if mask_basis is None else "mask_coefficients"] for pred in sets]
        logits = torch.stack([pred["pred_logits"].float() for pred in sets])  # [S, B, Q, K+1]
        labels = torch.cat([t["labels"] for t in targets])
        assignment = None
        if any(counts):
            coords, draws = self._draws(len(sets), counts, num_queries, generators, device)
            costs = self.matcher.batched_costs(
                logits,
                masks,
                pad_sequence([t["labels"] for t in targets], batch_first=True),
                sample_targets(target_stack, counts, coords),
                coords,
                mask_basis=mask_basis,
            )
            indices = assign(costs_to_host(costs), counts)
            assignment = host_assignment(indices, firsts, num_queries, device)
            if self.phase_mark is not None:
                self.phase_mark("matching")
            bce, dice = self._mask_losses(masks, assignment, draws, target_stack, norm, mask_basis)
        else:  # no targets in the batch: every set is empty
            # Zero terms that still reach every mask parameter (DDP expects their gradients).
            zero = 0.0 if mask_basis is None else mask_basis.sum() * 0.0
            bce = dice = torch.stack([m.sum() * 0.0 + zero for m in masks])
        class_losses = self._class_losses(logits, labels, assignment, norm)
        losses: dict[str, Tensor] = {}
        for i in range(len(sets)):
            suffix = "" if i == 0 else f"_{i - 1}"
            losses["loss_ce" + suffix] = self.class_weight * class_losses[i]
            losses["loss_mask" + suffix] = self.mask_weight * bce[i]
            losses["loss_dice" + suffix] = self.dice_weight * dice[i]
        reg = regulariser(outputs.get("cluster_scales", []), self.reg_weight)
        if reg is not None:
            losses["loss_reg"] = reg * (len(targets) / norm.num_images)
        return losses


def _shared_basis(sets: list[dict]) -> Tensor | None:
    """The ``mask_basis`` of the prediction sets (None when they hold dense ``pred_masks``);
    every set must hold its masks the same way, over the same basis."""
    basis = sets[0].get("mask_basis")
    for pred in sets:
        if pred.get("mask_basis") is not basis or ("pred_masks" in pred) != (basis is None):
            raise ValueError(
                "SetCriterion: every prediction set must hold either pred_masks or "
                "mask_coefficients over one shared mask_basis"
            )
    return basis


def masks_over_basis(
    coefficients: Tensor,
    basis: Tensor,
    *,
    order: tuple[Tensor, Tensor],
    counts: list[int],
) -> Tensor:
    """Row n's mask logits ``coefficients[n] @ basis[image of n]``: ``[N, C]`` coefficients
    and a ``[B, C, H, W]`` basis -> ``[N, H, W]`` (float32), one product per image.

    ``order`` holds the rows in image order (stable) and its inverse, ``counts`` the rows of
    each image (host integers, so nothing here waits for the device).
    """
    by_image, unsort = order
    flat = basis.float().flatten(2)
    parts = [c @ flat[b] for b, c in enumerate(coefficients.float()[by_image].split(counts))]
    return torch.cat(parts)[unsort].unflatten(-1, basis.shape[-2:])


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


def summary_values(losses: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    """:func:`summarize` on the device, for logging without waiting: the names and a float64
    ``[terms + 1]`` tensor of the terms summed over prediction sets, then the total."""
    terms: dict[str, list[int]] = {}
    for i, key in enumerate(losses):
        head, _, tail = key.rpartition("_")
        terms.setdefault(head if tail.isdigit() else key, []).append(i)
    values = torch.stack([v.detach().reshape(()) for v in losses.values()]).double()
    sums = [torch.stack([values[i] for i in rows]).sum() for rows in terms.values()]
    return [*terms, "loss"], torch.stack([*sums, values.sum()])
