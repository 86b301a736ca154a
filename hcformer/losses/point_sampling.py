"""Point sampling of mask logits (PointRend, as Mask2Former uses it for matching and the loss).

Losses and matching costs are computed on a set of points instead of every pixel (Sec. 4.1;
Mask2Former's point sampling, which the authors' code uses): the matcher uses ``num_points``
uniform points shared by all queries and targets of an image; the loss uses importance
sampling: ``oversample_ratio * num_points`` uniform candidates, of which the
``importance_sample_ratio`` most uncertain (uncertainty = -|logit|) are kept, plus uniform
points for the rest. Points are normalised coordinates, so predictions at any stride are
sampled where the full-resolution targets are.

Every draw takes an explicit ``torch.Generator`` so that the engine can key it by
(seed, iteration, global sample index): see :mod:`hcformer.engine.randomness`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(values: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values at normalised points.

    Arguments:
      values: ``[N, C, H, W]`` maps.
      coords: ``[N, P, 2]`` points as (x, y) in [0, 1] over the map's extent (pixel corners,
        i.e. ``align_corners=False``).

    Returns ``[N, C, P]``.
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2] in [-1, 1]
    return F.grid_sample(values, grid.to(values.dtype), align_corners=False).squeeze(3)


def row_slots(index: np.ndarray) -> tuple[np.ndarray, int]:
    """The slot of each row among the rows of its map (in row order) and the largest number of
    rows of a map, from a host ``[N]`` map index (what :func:`point_sample_rows` pads to)."""
    n = len(index)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    run = np.repeat(starts, np.diff(np.r_[starts, n]))
    slot = np.empty(n, dtype=np.int64)
    slot[order] = np.arange(n) - run
    return slot, int(slot.max()) + 1


def point_sample_rows(
    values: Tensor, index: Tensor, coords: Tensor, *, slots: tuple[Tensor, int] | None = None
) -> Tensor:
    """``point_sample(values[index], coords)`` without forming ``values[index]``.

    Arguments:
      values: ``[T, C, H, W]`` maps (e.g. every target mask of a batch, once).
      index: ``[N]`` the map each row samples (a map may serve several rows, or none).
      coords: ``[N, P, 2]`` each row's points, as in :func:`point_sample`.
      slots: ``(slot [N], k)`` of :func:`row_slots` when the host knows the index (then
        nothing here waits for the device); computed on the device otherwise.

    Returns ``[N, C, P]``. The rows of each map are sampled in one pass over it (padded to the
    largest number of rows of a map), so no map is copied however many rows read it.
    """
    n, p = coords.shape[:2]
    if slots is not None:
        slot, k = slots
    else:
        counts = torch.bincount(index, minlength=values.shape[0])
        k = int(counts.max()) if n else 0
        # The slot of each row among the rows of its map.
        order = torch.argsort(index, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(index)
        slot[order] = torch.arange(n, device=index.device) - first[index[order]]
    grid = coords.new_zeros(values.shape[0], k, p, 2)
    grid[index, slot] = coords
    out = point_sample(values, grid.flatten(1, 2)).unflatten(2, (k, p))  # [T, C, k, P]
    return out[index, :, slot]


def uniform_points(n: int, num_points: int, *, generator: torch.Generator, device) -> Tensor:
    """``[n, num_points, 2]`` uniform points in [0, 1]^2 drawn from ``generator``."""
    return torch.rand(n, num_points, 2, generator=generator, device=device)


@torch.no_grad()
def importance_points(logits: Tensor, draws: tuple[Tensor, Tensor], *, num_points: int) -> Tensor:
    """Points where the mask logits are most uncertain, plus uniform ones (PointRend).

    Arguments:
      logits: ``[N, 1, H, W]`` mask logits (one map per matched prediction).
      draws: the ``(candidates [N, S, 2], extra [N, R, 2])`` uniform points of
        :func:`importance_draws` (the criterion draws them image by image from each image's
        generator, then selects for the whole batch at once).
      num_points: points per map: the ``num_points - R`` most uncertain candidates
        (uncertainty = -|logit|), then the ``R`` extra ones.

    Returns ``[N, num_points, 2]`` points in [0, 1]^2.
    """
    candidates, extra = draws
    uncertainty = -point_sample(logits, candidates).abs()[:, 0, :]  # [N, S]
    top = torch.topk(uncertainty, k=num_points - extra.shape[1], dim=1).indices  # [N, k]
    chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([chosen, extra], dim=1) if extra.shape[1] else chosen


def importance_draws(
    n: int,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator,
    device,
) -> tuple[Tensor, Tensor]:
    """The random part of :func:`importance_points` for ``n`` maps, drawn from ``generator``:
    ``int(num_points * oversample_ratio)`` uniform candidates each, then the uniform points that
    fill the ``num_points - int(importance_sample_ratio * num_points)`` places the most uncertain
    candidates leave (in that order)."""
    num_sampled = int(num_points * oversample_ratio)
    if num_sampled < num_points:
        raise ValueError(f"oversample_ratio {oversample_ratio} must be >= 1")
    num_random = num_points - int(importance_sample_ratio * num_points)
    candidates = uniform_points(n, num_sampled, generator=generator, device=device)
    extra = uniform_points(n, num_random, generator=generator, device=device)
    return candidates, extra
