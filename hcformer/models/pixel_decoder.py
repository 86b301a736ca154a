"""MaskFormer's FPN pixel decoder: the upsampling that HCFormer removes (Sec. 3, Fig. 4, Table III).

MaskFormer (Cheng et al. 2021) turns the backbone's res2..res5 into stride-4 "per-pixel
embeddings" with a simple FPN (its ``BasePixelDecoder``): top-down from res5, each finer level
adds a lateral 1x1 conv of its backbone feature to the 2x nearest-upsampled coarser output and
refines the sum with a 3x3 conv; every conv is followed by GroupNorm(32) (the output convs also
by ReLU), and a last 3x3 conv gives the ``mask_dim`` mask features. MaskFormer's COCO panoptic
R50/R101 models ("R50 + 6 Enc") first run a DETR transformer encoder on res5
(``TransformerEncoderPixelDecoder``): a 1x1 input projection (no norm), the sine position, 6
post-norm encoder layers; the encoder's output is then both the transformer decoder's memory
and the top of the FPN. The per-pixel "FPN" baseline of Table I uses the same decoder without
the encoder.

The decoder is part of the head (it trains at the base learning rate, as in MaskFormer), not of
the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hcformer.models.encoder import TransformerEncoder
from hcformer.models.position_encoding import PositionEmbeddingSine
from hcformer.models.transformer_decoder import xavier_init

FEATURES = ("res2", "res3", "res4", "res5")


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's XavierFill as detectron2 initialises MaskFormer's convs (kaiming-uniform, a=1)."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) at the paper's widths; fewer groups when a tiny width is not divisible."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def conv_gn(in_channels: int, out_channels: int, kernel_size: int, *, relu: bool) -> nn.Sequential:
    """A bias-free conv + GroupNorm (+ ReLU), as detectron2's ``Conv2d(norm="GN")``."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    c2_xavier_fill(conv)
    layers: list[nn.Module] = [conv, group_norm(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PixelDecoderEncoder(TransformerEncoder):
    """The transformer encoder of MaskFormer's ``TransformerEncoderPixelDecoder`` on res5.

    The HCFormer+ encoder (:class:`hcformer.models.encoder.TransformerEncoder`: same arguments,
    layers and forward; defaults d 256, 6 layers "R50 + 6 Enc", 8 heads, FFN 2048, dropout 0.1)
    but for its input projection, a 1x1 conv with bias and no norm, and MaskFormer's init order:
    the layers first (Xavier), then the projection (Caffe2 Xavier).
    """

    def _build(self, in_channels: int, d_model: int, layers: Callable[[], nn.ModuleList]) -> None:
        self.layers = layers()
        xavier_init(self.layers)
        self.input_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        c2_xavier_fill(self.input_proj)
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=d_model // 2, normalize=True)


class FPNPixelDecoder(nn.Module):
    """MaskFormer's FPN pixel decoder: res2..res5 -> stride-4 mask features.

    Arguments:
      in_channels: channels of ``res2``..``res5`` (e.g. 256/512/1024/2048 for R50).
      conv_dim: width of the FPN (256).
      mask_dim: width of the mask features (256).
      encoder: optional :class:`PixelDecoderEncoder` on res5 (MaskFormer "+ 6 Enc"); its output
        feeds the top of the FPN and is returned as the transformer decoder's memory.
    """

    def __init__(
        self,
        *,
        in_channels: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        encoder: PixelDecoderEncoder | None = None,
    ) -> None:
        super().__init__()
        missing = [k for k in FEATURES if k not in in_channels]
        if missing:
            raise ValueError(f"FPNPixelDecoder needs features {list(FEATURES)}, missing {missing}")
        self.encoder = encoder
        top_in = encoder.out_channels if encoder is not None else in_channels["res5"]
        # Top-down order: res5 first (no lateral conv), then res4, res3, res2.
        self.top_conv = conv_gn(top_in, conv_dim, 3, relu=True)
        self.lateral_convs = nn.ModuleList(
            conv_gn(in_channels[k], conv_dim, 1, relu=False) for k in FEATURES[-2::-1]
        )
        self.output_convs = nn.ModuleList(
            conv_gn(conv_dim, conv_dim, 3, relu=True) for _ in FEATURES[-2::-1]
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)
        self.out_channels = mask_dim

    def forward(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features`` res2..res5 -> (mask features [B, mask_dim, H/4, W/4], encoder memory or None)."""
        top = features["res5"]
        memory = None
        if self.encoder is not None:
            top = memory = self.encoder(top)
        y = self.top_conv(top)
        for name, lateral, output in zip(FEATURES[-2::-1], self.lateral_convs, self.output_convs):
            lat = lateral(features[name])
            # FPN's nearest-neighbour upsampling, as MaskFormer.
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_features(y), memory
