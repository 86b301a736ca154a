"""The HCFormer+ transformer encoder on the stride-32 map (Sec. 2.5, Table 1).

HCFormer+ inserts a standard DETR encoder after the backbone: a 1x1 conv to d + GroupNorm(32),
the normalised sine position (added to queries and keys of every layer), then
``num_layers`` post-norm encoder layers (self-attention, FFN; d 256, 8 heads, FFN 2048,
dropout 0.1; no final norm since the layers are post-norm). The authors' code places it
inside the backbone, so it trains at the backbone's learning rate: :class:`BackboneWithEncoder`
wraps both so every parameter name starts with ``backbone.``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from hcformer.models.position_encoding import PositionEmbeddingSine
from hcformer.models.transformer_decoder import AttentionLayer, FFNLayer, layer_stack, xavier_init


class EncoderLayer(nn.Module):
    """One DETR encoder layer: self-attention (positions on queries and keys), FFN."""

    def __init__(self, *, d_model: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = AttentionLayer(d_model=d_model, nheads=nheads, dropout=dropout)
        self.ffn = FFNLayer(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(src, query_pos=pos))


class TransformerEncoder(nn.Module):
    """The HCFormer+ encoder: [B, in_channels, h, w] -> [B, d_model, h, w].

    Arguments:
      in_channels: channels of the backbone's stride-32 map (2048 R50, 768 Swin-S, 1536 Swin-L).
      d_model: width of the encoder and of its output (256).
      num_layers: encoder layers (6).
      nheads: attention heads (8).
      dim_feedforward: FFN width (2048).
      dropout: dropout of attention and FFN (0.1).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        d_model: int = 256,
        num_layers: int = 6,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.out_channels = d_model
        layers = functools.partial(
            layer_stack,
            EncoderLayer,
            num_layers,
            d_model=d_model,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        self._build(in_channels, d_model, layers)

    def _build(self, in_channels: int, d_model: int, layers: Callable[[], nn.ModuleList]) -> None:
        """Create ``input_proj``, ``pe_layer`` and ``layers`` (made by calling ``layers``), in the
        order that draws their random init: here the projection with its GroupNorm, then the
        layers, then Xavier on every weight matrix."""
        groups = 32 if d_model % 32 == 0 else 1  # GroupNorm(32) at the paper's width
        self.input_proj = nn.Sequential(
            nn.Conv2d(in_channels, d_model, kernel_size=1), nn.GroupNorm(groups, d_model)
        )
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=d_model // 2, normalize=True)
        self.layers = layers()
        xavier_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        b, c, h, w = x.shape
        pos = self.pe_layer(x).flatten(2).permute(2, 0, 1)
        src = x.flatten(2).permute(2, 0, 1)  # [hw, B, d]
        for layer in self.layers:
            src = layer(src, pos)
        return src.permute(1, 2, 0).reshape(b, c, h, w)


class BackboneWithEncoder(nn.Module):
    """A backbone whose stride-32 output ``res5`` passes through the HCFormer+ encoder.

    Behaves as the wrapped backbone (same output type, ``out_channels`` with res5 replaced),
    so the model sees one module named ``backbone``.

    Arguments:
      body: the backbone (``build_backbone``'s module).
      encoder: the :class:`TransformerEncoder` applied to ``res5``.
    """

    def __init__(self, *, body: nn.Module, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.body = body
        self.encoder = encoder
        self.out_channels = {**body.out_channels, "res5": encoder.out_channels}
        self.strides = getattr(body, "strides", None)

    def forward(self, x: torch.Tensor):  # -> BackboneOutput (a NamedTuple)
        out = self.body(x)
        return out._replace(features={**out.features, "res5": self.encoder(out.features["res5"])})
