"""Hungarian matching between predicted masks and ground-truth segments (Sec. 4.1).

As Mask2Former's matcher, which the authors' code uses: for each image the cost of assigning
query q to target n is ``class_weight * (-p_q(c_n)) + mask_weight * BCE + dice_weight * dice``,
with BCE and dice evaluated on ``num_points`` uniform points shared by all queries and targets of
the image; the assignment minimising the total cost comes from
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

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
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        masks: Tensor,
        *,
        generator: torch.Generator,
    ) -> Tensor:
        """The ``[Q, N]`` cost of one image (:meth:`cost_matrices` of a batch of one).

        Arguments:
          pred_logits: ``[Q, K+1]`` class logits (the last class is "no object").
          pred_masks: ``[Q, h, w]`` mask logits at the model's output stride (any size: they
            and the targets are sampled at the same normalised points).
          labels: ``[N]`` target classes.
          masks: ``[N, H, W]`` target masks (full resolution; sampled at the same points).
          generator: the source of the shared uniform points.
        """
        target = {"labels": labels, "masks": masks}
        (cost,) = self.cost_matrices(pred_logits[None], pred_masks[None], [target], [generator])
        return cost

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
        """Per image, the ``[Q, N]`` cost (``None`` for an image without targets).

        Each image with targets draws ``num_points`` uniform points from its own generator,
        shared by its queries and targets; then every image and target is sampled in one pass.
        With ``mask_basis`` [B, C, h, w], ``pred_masks`` are [B, Q, C] coefficients over it
        (the logits are their products; sampling is linear, so the basis is sampled instead).
        """
        live = [b for b, t in enumerate(targets) if t["labels"].numel()]
        costs: list[Tensor | None] = [None] * len(targets)
        if not live:
            return costs
        device = pred_masks.device
        coords = torch.cat(
            [
                uniform_points(1, self.num_points, generator=generators[b], device=device)
                for b in live
            ]
        )  # [L, P, 2]
        every = len(live) == len(targets)
        masks = pred_masks if every else pred_masks[live]
        logits = pred_logits if every else pred_logits[live]
        if mask_basis is None:
            out = point_sample(masks.float(), coords)  # [L, Q, P]
        else:
            basis = mask_basis if every else mask_basis[live]
            out = masks.float() @ point_sample(basis.float(), coords)  # [L, Q, C] @ [L, C, P]
        # Targets image by image (no copy of their full-size masks), padded to the largest
        # count (padding columns dropped).
        counts = [len(targets[b]["labels"]) for b in live]
        tgt_points = [
            point_sample(targets[b]["masks"][:, None].float(), coords[i, None].expand(n, -1, -1))
            for i, (b, n) in enumerate(zip(live, counts, strict=True))
        ]  # [N_b, 1, P] each
        tgt = pad_sequence([t[:, 0] for t in tgt_points], batch_first=True)  # [L, n_max, P]
        labels = pad_sequence([targets[b]["labels"] for b in live], batch_first=True)
        probs = logits.float().softmax(-1)  # [L, Q, K+1]
        cost = (
            self.class_weight * -probs.gather(2, labels[:, None, :].expand(-1, probs.shape[1], -1))
            + self.mask_weight * pairwise_sigmoid_ce(out, tgt)
            + self.dice_weight * pairwise_dice(out, tgt)
        )  # [L, Q, n_max]
        for i, b in enumerate(live):
            costs[b] = cost[i, :, : counts[i]]
        return costs

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: list[dict[str, Tensor]],
        generators: list[torch.Generator],
        *,
        mask_basis: Tensor | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, ``(query indices, target indices)`` of the optimal assignment.

        Arguments:
          pred_logits: ``[B, Q, K+1]``; pred_masks: ``[B, Q, h, w]``, or ``[B, Q, C]``
            coefficients over ``mask_basis`` ``[B, C, h, w]``.
          targets: per image ``{"labels": [N], "masks": [N, H, W]}``.
          generators: one per image.
        """
        result = []
        costs = self.cost_matrices(
            pred_logits, pred_masks, targets, generators, mask_basis=mask_basis
        )
        for cost in costs:
            if cost is None:
                empty = torch.zeros(0, dtype=torch.int64)
                result.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            result.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return result
