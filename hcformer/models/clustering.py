"""The clustering module of Sec. 2.2 (eq. 3) and the level-by-level mask decoding of Sec. 2.3 (eq. 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from hcformer import ops


class ClusteringModule(nn.Module):
    """Soft clustering of a backbone's fine map onto its downsampled map (Fig. 2, eq. 3).

    Each of the fine and the coarse feature map goes through its own LayerNorm over channels and
    its own 1x1 convolution (no bias, xavier-normal init) to ``cluster_dim`` = C_F channels, is
    L2-normalised over channels, and ``hcformer.ops.clustering`` forms the soft assignment of each
    fine pixel to the 9 coarse cells around its parent, with logits cosine / (1e-8 + |s|) for a
    trainable scalar s (``scale``).
    """

    def __init__(
        self,
        *,
        fine_channels: int,
        coarse_channels: int,
        cluster_dim: int = 128,
        scale_init: float = 0.1,
    ) -> None:
        """
        Arguments:
          fine_channels: channels of the feature map before the downsampling.
          coarse_channels: channels of the feature map after the downsampling.
          cluster_dim: C_F, the channels the similarity is computed in (128 in the paper).
          scale_init: initial value of s(i) (0.1 in the paper).
        """
        super().__init__()
        # nn.LayerNorm over the channels of each pixel with its default eps 1e-5, as the
        # authors' clustering module (they transpose to channels-last around nn.LayerNorm).
        self.fine_norm = LayerNorm2d(fine_channels, eps=1e-5)
        self.coarse_norm = LayerNorm2d(coarse_channels, eps=1e-5)
        self.fine_proj = nn.Conv2d(fine_channels, cluster_dim, kernel_size=1, bias=False)
        self.coarse_proj = nn.Conv2d(coarse_channels, cluster_dim, kernel_size=1, bias=False)
        nn.init.xavier_normal_(self.fine_proj.weight)
        nn.init.xavier_normal_(self.coarse_proj.weight)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def embed(self, fine: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The L2-normalised C_F-dimensional embeddings F(i) and F_d(i) of Sec. 2.2."""
        f = F.normalize(self.fine_proj(self.fine_norm(fine)), dim=1)
        c = F.normalize(self.coarse_proj(self.coarse_norm(coarse)), dim=1)
        return f, c

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """fine [B, C_fine, H, W], coarse [B, C_coarse, H/2, W/2] -> assignment [B, 9, H, W]."""
        f, c = self.embed(fine, coarse)
        return ops.clustering(f, c, self.scale)


def decode_masks(
    masks: torch.Tensor, assignments: Sequence[torch.Tensor], levels_total: int | None = None
) -> torch.Tensor:
    """Decode mask logits from the coarsest map level by level (eq. 5, Sec. 2.3).

    The clustering modules sit at the LAST L = len(assignments) downsamplings of the backbone (the
    deepest ones: the authors' ``hierarchy_level = L`` keeps the last L; L = 1 is the 16 -> 32
    downsampling only). Decoding runs coarsest first, so the first L upsamplings (32 -> 16, ...)
    use eq. (5) with the assignments, deepest first. By default that is all: the result is at
    stride 32 / 2**L, as the authors' HCFormer decodes (eq. 5 for the modules present, nothing
    else; their inference then resizes once to the input). With ``levels_total`` > L the
    remaining ``levels_total - L`` steps are 2x bilinear (align_corners=False): the per-pixel HC
    models decode to stride 4 with ``levels_total = 3``.

    Arguments:
      masks: [B, ..., h, w] mask logits at the coarsest level (stride 32); any number of middle
        dims, e.g. [B, Q, h, w] or all prediction sets stacked as [B, S, Q, h, w]: every
        channel is decoded with the same neighbour weights in one call per level.
      assignments: soft assignments fine to coarse, each [B, 9, H_i, W_i] (e.g. strides 4->8,
        8->16, 16->32); the last one must be at twice the resolution of ``masks``.
      levels_total: number of 2x upsamplings in all (3: stride 32 -> stride 4); None (the
        default): L, one per assignment.

    Returns:
      [B, ..., h * 2**levels_total, w * 2**levels_total], in the memory format of ``masks``
      (``masks`` itself when there is nothing to decode)
      (``ops.decode`` and bilinear upsampling both keep it).

    Small coarse maps (at most ``BASIS_DECODE_MAX_CELLS`` cells, fewer than the channels, as the
    6 x 6 stride-32 map of a 192 x 192 image) are decoded through the one-hot map of each cell
    instead: the same linear map of eq. (5), evaluated in the cheaper order.
    """
    if masks.dim() < 3:
        raise ValueError(f"decode_masks: expected masks [B, ..., h, w], got {tuple(masks.shape)}")
    n_modules = len(assignments)
    if levels_total is None:
        levels_total = n_modules
    if n_modules > levels_total:
        raise ValueError(
            f"decode_masks: {n_modules} assignments given but only {levels_total} levels to decode"
        )
    lead = masks.shape[:-2]
    b, (h, w) = masks.shape[0], masks.shape[-2:]
    x = masks.reshape(b, -1, h, w)
    for step in range(min(n_modules, levels_total)):
        assignment = assignments[n_modules - 1 - step]
        size = (h << (step + 1), w << (step + 1))
        if assignment.shape[0] != b or tuple(assignment.shape[-2:]) != size:
            raise ValueError(
                f"decode_masks: decoding step {step} needs an assignment [{b}, 9, {size[0]}, "
                f"{size[1]}], got {tuple(assignment.shape)} (assignments fine to coarse: "
                f"{[tuple(a.shape) for a in assignments]}, masks {tuple(masks.shape)})"
            )
    if levels_total == 0:
        return masks
    if uses_basis((h, w), x.shape[1]) and x.is_contiguous():
        # Eq. (5) is linear in the masks and the same for every channel: decode the one-hot
        # map of each coarse cell (h * w channels) and combine the channels with one batched
        # product. Same result as decoding the channels (the matrix chain taken in the other
        # order), far fewer passes over the large fine maps when the coarse map is small.
        basis = decode_basis(
            assignments, (h, w), levels_total, batch_size=b, dtype=x.dtype, device=x.device
        )
        return masks_from_basis(x.flatten(2), basis).reshape(*lead, *basis.shape[-2:])
    out = _decode_levels(x, assignments, levels_total)
    return out.reshape(*lead, *out.shape[-2:])


def uses_basis(coarse_size: tuple[int, int], channels: int) -> bool:
    """Whether ``decode_masks`` of ``channels`` maps of ``coarse_size`` goes through the
    one-hot basis of the coarse cells (:func:`decode_basis`): small maps, more channels than
    cells."""
    cells = coarse_size[0] * coarse_size[1]
    return cells <= BASIS_DECODE_MAX_CELLS and cells < channels


def decode_basis(
    assignments: Sequence[torch.Tensor],
    coarse_size: tuple[int, int],
    levels_total: int | None = None,
    *,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The one-hot map of every coarse cell decoded with eq. (5): ``[B, h * w, H, W]``.

    Decoding is linear, so the decoded masks of any coarse logits ``m`` [B, C, h, w] are
    ``m.flatten(2) @ basis.flatten(2)``: channel c of the result is the sum over cells of
    m[:, c, cell] times that cell's decoded map. ``assignments`` and ``levels_total`` as in
    :func:`decode_masks` (the deepest assignment at twice ``coarse_size``).
    """
    h, w = coarse_size
    if levels_total is None:
        levels_total = len(assignments)
    eye = torch.eye(h * w, dtype=dtype, device=device).expand(batch_size, h * w, h * w)
    return _decode_levels(eye.reshape(batch_size, h * w, h, w), assignments, levels_total)


def masks_from_basis(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Decoded masks from coarse logits over a :func:`decode_basis`: ``coefficients``
    [B, ..., h * w] (one row per mask), ``basis`` [B, h * w, H, W] -> [B, ..., H, W], in the
    promoted dtype of the two (as ``ops.decode`` promotes)."""
    b, cells = coefficients.shape[0], coefficients.shape[-1]
    dtype = torch.promote_types(coefficients.dtype, basis.dtype)
    out = torch.bmm(coefficients.reshape(b, -1, cells).to(dtype), basis.flatten(2).to(dtype))
    return out.reshape(*coefficients.shape[:-1], *basis.shape[-2:])


# Up to this many coarse cells (and fewer cells than channels) ``decode_masks`` decodes the cells'
# one-hot maps and mixes them. Measured on 2 CPU threads, batch 8, 900 channels (100 with a
# gradient), forward + backward, one-hot basis against level by level: 4 x 4 cells 22 vs 90 ms,
# 6 x 6 67 vs 176, 8 x 8 170 vs 320, 6 x 12 202 vs 399, 12 x 12 625 vs 909; 16 x 16 400 vs 331.
BASIS_DECODE_MAX_CELLS = 144


def _decode_levels(
    x: torch.Tensor, assignments: Sequence[torch.Tensor], levels_total: int
) -> torch.Tensor:
    """``x`` [B, C, h, w] decoded ``levels_total`` times: eq. (5) with the deepest assignment
    first, then 2x bilinear for the levels without a clustering module."""
    n_modules = len(assignments)
    for step in range(levels_total):
        if step < n_modules:
            x = ops.decode(x, assignments[n_modules - 1 - step])
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return x
