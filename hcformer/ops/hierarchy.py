"""Hard clustering through the hierarchy (eq. 2 applied to every level of eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hcformer.ops._checks import outside_mask


def hard_parents(assignment: torch.Tensor) -> torch.Tensor:
    """Flat index into the coarse map of each fine pixel's hard cluster: argmax of eq. (3) (eq. 2).

    Arguments:
      assignment: [B, 9, H, W] soft assignment (candidates in ``F.unfold`` order).

    Returns:
      LongTensor [B, H, W] with values in [0, H/2 * W/2): (y // 2 + dy) * W/2 + (x // 2 + dx) for
      the winning candidate. Candidates outside the coarse map never win (ties break to the
      lowest candidate index among those inside the map).
    """
    if assignment.dim() != 4 or assignment.shape[1] != 9:
        raise ValueError(
            f"hard_parents: expected an assignment [B, 9, H, W], got {tuple(assignment.shape)}"
        )
    b, _, h, w = assignment.shape
    if h % 2 or w % 2:
        raise ValueError(f"hard_parents: H and W must be even, got {tuple(assignment.shape)}")
    hc, wc = h // 2, w // 2
    dev = assignment.device
    outside = outside_mask(hc, wc, device=dev)
    scores = assignment.masked_fill(outside, float("-inf"))
    k = scores.argmax(1)  # [B, H, W]
    ys = torch.arange(h, device=dev).view(1, h, 1) // 2 + k // 3 - 1
    xs = torch.arange(w, device=dev).view(1, 1, w) // 2 + k % 3 - 1
    return ys * wc + xs


def hard_clusters(assignments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Hard clusters of every level, composed up to the coarsest map (eq. 2 through the hierarchy).

    Arguments:
      assignments: soft assignments fine to coarse (e.g. strides 4->8, 8->16, 16->32), each
        [B, 9, H_i, W_i] with H_{i+1} = H_i / 2.

    Returns:
      One LongTensor [B, H_i, W_i] per level: the flat index (row-major) of the cell of the
      coarsest map reached (H_last / 2 x W_last / 2, stride 32 for a full hierarchy) that each pixel
      of level i ends up in when every pixel follows its argmax parent. Used for the
      undersegmentation error and the Fig. 5 view.
    """
    if len(assignments) == 0:
        return []
    for fine, coarse in zip(assignments[:-1], assignments[1:]):
        if fine.shape[0] != coarse.shape[0] or tuple(coarse.shape[2:]) != (
            fine.shape[2] // 2,
            fine.shape[3] // 2,
        ):
            raise ValueError(
                "hard_clusters: each assignment must be at half the resolution of the previous "
                f"one (fine to coarse), got {[tuple(a.shape) for a in assignments]}"
            )
    labels: list[torch.Tensor] = []
    below: torch.Tensor | None = None  # labels of the coarse map of the current level
    for assignment in reversed(assignments):
        parents = hard_parents(assignment)  # [B, H, W] flat index into this level's coarse map
        if below is not None:
            parents = below.flatten(1).gather(1, parents.flatten(1)).view_as(parents)
        labels.append(parents)
        below = parents
    return labels[::-1]
