"""Undersegmentation error of a hard clustering (Sec. 2.4 and Fig. 5 of the paper, ref. [47]).

The "corrected" undersegmentation error of Neubert & Protzel (2012), as benchmarked by Stutz
et al. (2018), which the paper cites: for ground-truth segments G_i and clusters S_j over N
pixels,

    UE = 1/N * sum_i sum_{j : S_j meets G_i} min(|S_j & G_i|, |S_j - G_i|),

i.e. every cluster that straddles a ground-truth boundary is charged its smaller part on each
segment it overlaps ("leakage"), without the double counting of the original definition. The
ground-truth segments are the label values of ``gt`` (semantic regions); pixels labelled
``ignore`` are left out entirely (of N and of every cluster). Returned in percent.
"""

from __future__ import annotations

import numpy as np

from hcformer.data.base import IGNORE_LABEL


def upsample_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (torch's ``nearest``: floor(dst * in / out))."""
    h, w = labels.shape
    H, W = size
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    return labels[rows][:, cols]


def undersegmentation_error(
    labels: np.ndarray, gt: np.ndarray, ignore: int = IGNORE_LABEL
) -> float:
    """Corrected undersegmentation error (percent) of cluster map ``labels`` against ``gt``.

    ``labels`` may be at a lower resolution than ``gt`` (e.g. a stride-8 cluster map): it is
    upsampled by nearest neighbour to ``gt``'s size first.
    """
    labels, gt = np.asarray(labels), np.asarray(gt)
    if labels.ndim != 2 or gt.ndim != 2:
        raise ValueError(
            f"undersegmentation_error: expected 2-D maps, got {labels.shape} and {gt.shape}"
        )
    if labels.shape != gt.shape:
        labels = upsample_nearest(labels, gt.shape)
    keep = gt != ignore
    g = gt[keep].astype(np.int64)
    s = labels[keep].astype(np.int64)
    n = g.size
    if n == 0:
        return 0.0
    _, g = np.unique(g, return_inverse=True)
    _, s = np.unique(s, return_inverse=True)
    joint = np.bincount(s * (g.max() + 1) + g)  # |S_j & G_i| for each (j, i)
    pairs = np.flatnonzero(joint)
    inter = joint[pairs]
    size_s = np.bincount(s)[pairs // (g.max() + 1)]
    leak = np.minimum(inter, size_s - inter).sum()
    return 100.0 * float(leak) / n
