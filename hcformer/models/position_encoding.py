"""The normalised 2-D sine positional encoding of DETR, used by the HCFormer head (Sec. 4.1).

The head and the HCFormer+ encoder add it to the keys of the stride-32 memory. With
``num_pos_feats = d/2`` per axis (128 for d = 256), channel ``2i`` of an axis is
``sin(p / T^(2i/n))`` and channel ``2i+1`` is ``cos(p / T^(2i/n))``, where ``p`` is the
(1-based) cumulative coordinate rescaled to ``(0, 2*pi]`` when ``normalize`` is set. The
y channels come first, then the x channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the pixel coordinates of a feature map.

    Arguments:
      num_pos_feats: channels per axis (the output has ``2 * num_pos_feats`` channels).
      temperature: the base ``T`` of the frequencies.
      normalize: rescale coordinates to ``(0, scale]`` (the paper's setting).
      scale: the range of the normalised coordinates (``2*pi``).
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] (only its shape, device and dtype are used) -> [B, 2n, H, W]."""
        b, _, h, w = x.shape
        y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
        x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (h + eps) * self.scale
            x_embed = x_embed / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[..., None] / dim_t  # [H, W, n]
        pos_y = y_embed[..., None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
        pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)  # [2n, H, W]
        return pos.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)
