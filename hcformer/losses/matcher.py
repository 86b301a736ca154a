"""Hungarian matching between predicted masks and ground-truth segments (Sec. 4.1).

As Mask2Former's matcher, which the authors' code uses: for each image the cost of assigning
query q to target n is ``class_weight * (-p_q(c_n)) + mask_weight * BCE + dice_weight * dice``,
with BCE and dice evaluated on ``num_points`` uniform points shared by all queries and targets of
the image; the assignment minimising the total cost comes from
``scipy.optimize.linear_sum_assignment``.

The costs of every prediction set (deep supervision) and every image are computed on the device
in one batch (targets padded to the largest count of an image), copied to the host in ONE
transfer (the one synchronisation of a training step), and assigned there set by set and image
by image (:func:`assign`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from hcformer.losses.point_sampling import point_sample, uniform_points


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over points of every (prediction, target) pair.

    ``logits`` ``[..., Q, P]``, ``targets`` ``[..., N, P]`` in {0, 1} -> ``[..., Q, N]``.
    """
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - x * t.
    cost = F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.transpose(-1, -2)
    return cost / logits.shape[-1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` of every pair:
    ``[..., Q, P] x [..., N, P] -> [..., Q, N]``."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.transpose(-1, -2)
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def sample_targets(target_stack: Tensor, counts: list[int], coords: Tensor) -> Tensor:
    """Every target mask at its image's points of every set, padded per image.

    Arguments:
      target_stack: ``[T, 1, H, W]`` float target masks of the batch, image after image.
      counts: the number of targets of each of the B images (host integers).
      coords: ``[S, B, P, 2]`` each set's points of each image.

    Returns ``[S, B, n_max, P]`` (zero rows pad an image to the largest count). Each mask is
    sampled once, at all sets' points (one ``grid_sample`` over the stack).
    """
    s, _, p, _ = coords.shape
    # Row t reads its image's points of every set: [T, S * P, 2] (no index sent to the device).
    per_row = [coords[:, b, None].expand(-1, n, -1, -1) for b, n in enumerate(counts) if n]
    grid = torch.cat(per_row, 1).permute(1, 0, 2, 3).flatten(1, 2)
    sampled = point_sample(target_stack, grid)[:, 0].unflatten(1, (s, p))  # [T, S, P]
    padded = pad_sequence(list(sampled.split(counts)), batch_first=True)  # [B, n_max, S, P]
    return padded.permute(2, 0, 1, 3)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets by minimum total cost.

    Arguments:
      class_weight: weight of the class cost ``-p(c)`` (2.0).
      mask_weight: weight of the point-sampled BCE cost (5.0).
      dice_weight: weight of the point-sampled dice cost (5.0).
      num_points: uniform points per image (12544 at paper scale).
    """

    def __init__(
        self, *, class_weight: float, mask_weight: float, dice_weight: float, num_points: int
    ) -> None:
        super().__init__()
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def batched_costs(
        self,
        pred_logits: Tensor,
        pred_masks: list[Tensor],
        labels: Tensor,
        target_points: Tensor,
        coords: Tensor,
        *,
        mask_basis: Tensor | None = None,
    ) -> Tensor:
        """The ``[S, B, Q, n_max]`` costs of S prediction sets over B images, on the device.

        Arguments:
          pred_logits: ``[S, B, Q, K+1]`` class logits of every set (the last class is "no
            object").
          pred_masks: per set ``[B, Q, h, w]`` mask logits at the model's output stride (any
            size: they and the targets are sampled at the same normalised points), or
            ``[B, Q, C]`` coefficients over ``mask_basis`` ``[B, C, h, w]`` (sampling is
            linear, so the basis is sampled once for all sets instead).
          labels: ``[B, n_max]`` target classes, padded (the padding columns are meaningless).
          target_points: ``[S, B, n_max, P]`` the targets at the points (:func:`sample_targets`).
          coords: ``[S, B, P, 2]`` the points of each set and image.
        """
        s, b, p, _ = coords.shape
        if mask_basis is None:
            out = torch.stack(
                [point_sample(m.float(), c) for m, c in zip(pred_masks, coords, strict=True)]
            )  # [S, B, Q, P]
        else:
            basis = point_sample(mask_basis.float(), coords.permute(1, 0, 2, 3).flatten(1, 2))
            # [B, C, S * P] -> [S, B, C, P], each [C, P] block contiguous.
            basis = basis.unflatten(2, (s, p)).permute(2, 0, 1, 3).contiguous()
            out = torch.stack([m.float() for m in pred_masks]) @ basis  # [S, B, Q, P]
        probs = pred_logits.float().softmax(-1)  # [S, B, Q, K+1]
        index = labels[None, :, None, :].expand(s, -1, probs.shape[2], -1)
        return (
            self.class_weight * -probs.gather(3, index)
            + self.mask_weight * pairwise_sigmoid_ce(out, target_points)
            + self.dice_weight * pairwise_dice(out, target_points)
        )

    def draw_points(self, counts: list[int], generators: list[torch.Generator], device) -> Tensor:
        """``[B, P, 2]`` uniform points of one set: drawn from each image's generator when the
        image has targets (zeros, and nothing drawn, otherwise)."""
        coords = torch.zeros(len(counts), self.num_points, 2, device=device)
        for b, n in enumerate(counts):
            if n:
                coords[b] = uniform_points(
                    1, self.num_points, generator=generators[b], device=device
                )[0]
        return coords

    @torch.no_grad()
    def cost_matrices(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict[str, Tensor]],
        generators: list[torch.Generator],
        *,
        mask_basis: Tensor | None = None,
    ) -> list[Tensor | None]:
        """Per image, the ``[Q, N]`` cost of one prediction set (``None`` for an image without
        targets); each image with targets draws ``num_points`` uniform points from its own
        generator, shared by its queries and targets.

        Arguments:
          pred_logits: ``[B, Q, K+1]``; pred_masks: ``[B, Q, h, w]``, or ``[B, Q, C]``
            coefficients over ``mask_basis`` ``[B, C, h, w]``.
          targets: per image ``{"labels": [N], "masks": [N, H, W]}``.
          generators: one per image.
        """
        counts = [int(t["labels"].shape[0]) for t in targets]
        if not any(counts):
            return [None] * len(targets)
        device = pred_masks.device
        coords = self.draw_points(counts, generators, device)[None]
        stack = torch.cat([t["masks"] for t in targets]).float()[:, None]
        labels = pad_sequence([t["labels"] for t in targets], batch_first=True)
        cost = self.batched_costs(
            pred_logits[None],
            [pred_masks],
            labels,
            sample_targets(stack, counts, coords),
            coords,
            mask_basis=mask_basis,
        )[0]
        return [cost[b, :, :n] if n else None for b, n in enumerate(counts)]

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        masks: Tensor,
        *,
        generator: torch.Generator,
    ) -> Tensor:
        """The ``[Q, N]`` cost of one image (:meth:`cost_matrices` of a batch of one)."""
        target = {"labels": labels, "masks": masks}
        (cost,) = self.cost_matrices(pred_logits[None], pred_masks[None], [target], [generator])
        return cost

    @torch.no_grad()
    def forward(self, *batch: Any, **options: Any) -> list[tuple[Tensor, Tensor]]:
        """Per image, ``(query indices, target indices)`` (host int64) of the optimal
        assignment of one prediction set; arguments as :meth:`cost_matrices`."""
        empty = np.zeros(0, dtype=np.int64)
        result = []
        for cost in self.cost_matrices(*batch, **options):
            rows, cols = (
                (empty, empty) if cost is None else linear_sum_assignment(cost.cpu().numpy())
            )
            result.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return result


def costs_to_host(costs: Tensor) -> np.ndarray:
    """Every cost matrix of a step on the host: the one device-to-host copy (and so the one
    wait for the device) of a training step."""
    return costs.cpu().numpy()


def assign(costs: np.ndarray, counts: list[int]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``linear_sum_assignment`` of every set and image of host costs ``[S, B, Q, n_max]``:
    per set, per image, ``(query indices, target indices)`` as int64 arrays (empty for an image
    without targets)."""
    empty = np.zeros(0, dtype=np.int64)
    out = []
    for per_set in costs:
        row = []
        for cost, n in zip(per_set, counts, strict=True):
            if n == 0:
                row.append((empty, empty))
                continue
            src, tgt = linear_sum_assignment(cost[:, :n])
            row.append((src.astype(np.int64), tgt.astype(np.int64)))
        out.append(row)
    return out
