"""Shape checks shared by the reference and the fast path of eq. (3) and eq. (5)."""

from __future__ import annotations

import torch


def check_clustering_args(
    feat: torch.Tensor, downsampled_feat: torch.Tensor, scale: torch.Tensor
) -> None:
    """Raise ValueError unless ``feat`` [B, C, H, W] and ``downsampled_feat`` [B, C, H/2, W/2] agree."""
    if feat.dim() != 4 or downsampled_feat.dim() != 4:
        raise ValueError(
            f"clustering: expected feat [B, C, H, W] and downsampled_feat [B, C, H/2, W/2], "
            f"got shapes {tuple(feat.shape)} and {tuple(downsampled_feat.shape)}"
        )
    b, c, h, w = feat.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"clustering: feat height and width must be even (each fine pixel has a 2x2 parent "
            f"cell), got feat shape {tuple(feat.shape)}"
        )
    expected = (b, c, h // 2, w // 2)
    if tuple(downsampled_feat.shape) != expected:
        raise ValueError(
            f"clustering: downsampled_feat must have shape {expected} for feat shape "
            f"{tuple(feat.shape)}, got {tuple(downsampled_feat.shape)}"
        )
    if scale.numel() != 1:
        raise ValueError(
            f"clustering: scale must be a scalar tensor, got shape {tuple(scale.shape)}"
        )


def check_decode_args(x: torch.Tensor, assignment: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` [B, C, H/2, W/2] and ``assignment`` [B, 9, H, W] agree."""
    if x.dim() != 4 or assignment.dim() != 4:
        raise ValueError(
            f"decode: expected x [B, C, H/2, W/2] and assignment [B, 9, H, W], got shapes "
            f"{tuple(x.shape)} and {tuple(assignment.shape)}"
        )
    b, k, h, w = assignment.shape
    if k != 9:
        raise ValueError(
            f"decode: assignment must have 9 candidates in dim 1 (3x3 neighbourhood), got shape "
            f"{tuple(assignment.shape)}"
        )
    if h % 2 or w % 2:
        raise ValueError(
            f"decode: assignment height and width must be even, got shape {tuple(assignment.shape)}"
        )
    if x.shape[0] != b or tuple(x.shape[2:]) != (h // 2, w // 2):
        raise ValueError(
            f"decode: x must have shape [{b}, C, {h // 2}, {w // 2}] for assignment shape "
            f"{tuple(assignment.shape)}, got {tuple(x.shape)}"
        )


def outside_mask(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [9, 2h, 2w]: True where candidate k of a fine pixel lies outside the h x w coarse map.

    Candidate k = 3 * (dy + 1) + (dx + 1) is the coarse cell (y // 2 + dy, x // 2 + dx), the order of
    ``F.unfold(kernel_size=3, padding=1)`` (row-major, k = 4 is the parent).
    """
    ys = torch.arange(2 * h, device=device) // 2
    xs = torch.arange(2 * w, device=device) // 2
    d = torch.arange(-1, 2, device=device)
    out_y = ((ys[None, :] + d[:, None]) < 0) | ((ys[None, :] + d[:, None]) >= h)  # [3, 2h]
    out_x = ((xs[None, :] + d[:, None]) < 0) | ((xs[None, :] + d[:, None]) >= w)  # [3, 2w]
    out = out_y[:, None, :, None] | out_x[None, :, None, :]  # [3, 3, 2h, 2w]
    return out.reshape(9, 2 * h, 2 * w)
