"""MaskFormer (Cheng et al. 2021), the baseline HCFormer is built from (Sec. 3, Fig. 4, Tables 1, III).

MaskFormer upsamples first and clusters afterwards: an FPN pixel decoder turns res2..res5 into
stride-4 mask features, and a DETR transformer decoder on the stride-32 features (MaskFormer's
``TRANSFORMER_IN_FEATURE``) predicts, per query, class logits and a mask embedding whose dot
product with the stride-4 mask features is the mask (eq. 4 at stride 4). HCFormer removes the
pixel decoder and decodes stride-32 masks through the backbone's clustering hierarchy instead.

As MaskFormer's code: the decoder is the standard DETR one (6 layers, 100 queries, dropout 0.1,
predictions after every layer for deep supervision); its memory is res5 through a 1x1
``input_proj``, or, for the "R50 + 6 Enc" COCO panoptic models, the output of the pixel
decoder's transformer encoder (already 256 wide: ``input_proj`` is the identity). No clustering
modules (``hierarchy_level: 0``): ``assignments`` and ``cluster_scales`` are empty.
"""

from __future__ import annotations

import torch
from torch import nn

from hcformer.config import ModelConfig
from hcformer.errors import ConfigError
from hcformer.models.backbones import build_backbone
from hcformer.models.build import check_keys, query_decoder, res5_encoder
from hcformer.models.hcformer import ImageModel, memory_projection
from hcformer.models.pixel_decoder import FPNPixelDecoder, PixelDecoderEncoder
from hcformer.models.position_encoding import PositionEmbeddingSine
from hcformer.models.transformer_decoder import StandardDecoder


class MaskFormer(ImageModel):
    """The MaskFormer mask-classification model.

    Arguments:
      backbone: a backbone without clustering modules (``build_backbone`` with
        ``hierarchy_level: 0``); ``out_channels`` names the widths of res2..res5.
      pixel_decoder: the :class:`FPNPixelDecoder` (with or without its transformer encoder).
      decoder: the standard DETR decoder (:class:`StandardDecoder`); it maps (memory, position,
        stride-4 mask features) to stacked class logits and mask logits of every layer.
      hidden_dim: width of the decoder's memory (256).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: FPNPixelDecoder,
        decoder: nn.Module,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        encoder = pixel_decoder.encoder
        in_channels = encoder.out_channels if encoder is not None else backbone.out_channels["res5"]
        self.input_proj = memory_projection(in_channels, hidden_dim)
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, normalize=True)
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> dict:
        """``images`` float [B, 3, H, W] RGB in 0..255, H and W multiples of 32.

        Returns the dict of docs/interfaces.md: ``pred_logits`` [B, Q, K+1], ``pred_masks``
        [B, Q, H/4, W/4], ``aux_outputs`` (training: the earlier layers' predictions; eval:
        ``[]``), ``assignments`` and ``cluster_scales`` (both empty: no clustering modules).
        """
        out = self.backbone(self.normalise(images))
        mask_features, memory = self.pixel_decoder(out.features)
        src = self.input_proj(memory if memory is not None else out.features["res5"])
        logits, masks = self.decoder(src, self.pe_layer(src), mask_features)  # [S, B, Q, ...]
        aux = []
        if self.training:
            aux = [
                {"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(len(masks) - 1)
            ]
        return {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": aux,
            "assignments": list(out.assignments),
            "cluster_scales": list(out.cluster_scales),
        }


def build_maskformer(cfg: ModelConfig) -> MaskFormer:
    """MaskFormer from the typed config (``model.head.type: maskformer``).

    ``head.encoder_layers`` is the number of transformer encoder layers in the pixel decoder
    (6 for MaskFormer's "R50 + 6 Enc" COCO panoptic models, 0 for its Swin models);
    ``head.decoder_layers`` (6), ``head.queries`` (100), ``head.decoder_dropout`` (0.1 in
    MaskFormer), ``head.pixel_decoder_dim`` (256) and ``head.mask_dim`` (256) as named.
    """
    head, bb = cfg.head, cfg.backbone
    if bb.hierarchy_level != 0:
        raise ConfigError(
            f"model.backbone.hierarchy_level: {bb.hierarchy_level} is not valid for "
            "model.head.type 'maskformer' (MaskFormer has no clustering modules: use 0)"
        )
    if bb.output_stride != 32:
        raise ConfigError(
            f"model.backbone.output_stride: {bb.output_stride} is not valid for model.head.type "
            "'maskformer' (its decoder reads the stride-32 features: use 32)"
        )
    if head.decoder != "standard":
        raise ConfigError(
            f"model.head.decoder: {head.decoder!r} is not valid for model.head.type 'maskformer' "
            "(MaskFormer uses the standard DETR decoder: use 'standard')"
        )
    checks: list[tuple[bool, str, object, str]] = [
        (head.queries >= 1, "model.head.queries", head.queries, ">= 1"),
        (head.decoder_layers >= 1, "model.head.decoder_layers", head.decoder_layers, ">= 1"),
        (head.encoder_layers >= 0, "model.head.encoder_layers", head.encoder_layers, ">= 0"),
        (
            head.pixel_decoder_dim >= 1,
            "model.head.pixel_decoder_dim",
            head.pixel_decoder_dim,
            ">= 1",
        ),
        (cfg.num_classes >= 1, "model.num_classes", cfg.num_classes, ">= 1"),
        (
            head.hidden_dim % head.nheads == 0,
            "model.head.nheads",
            head.nheads,
            f"a divisor of model.head.hidden_dim ({head.hidden_dim})",
        ),
        (
            head.hidden_dim % 4 == 0,
            "model.head.hidden_dim",
            head.hidden_dim,
            "a multiple of 4 (two sine encodings of hidden_dim/2 channels)",
        ),
        (
            head.encoder_layers == 0
            or (head.pixel_decoder_dim % head.nheads == 0 and head.pixel_decoder_dim % 4 == 0),
            "model.head.pixel_decoder_dim",
            head.pixel_decoder_dim,
            f"a multiple of 4 and of model.head.nheads ({head.nheads}): the encoder runs at it",
        ),
    ]
    check_keys(checks)
    # MaskFormer's Swin LayerNorms every stage output its FPN reads (no-op for ResNets).
    backbone = build_backbone(bb, norm_all_features=True)
    res5 = backbone.out_channels["res5"]
    encoder = res5_encoder(cfg, PixelDecoderEncoder, res5, head.pixel_decoder_dim)
    pixel_decoder = FPNPixelDecoder(
        in_channels=dict(backbone.out_channels),
        conv_dim=head.pixel_decoder_dim,
        mask_dim=head.mask_dim,
        encoder=encoder,
    )
    return MaskFormer(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        decoder=query_decoder(cfg, StandardDecoder),
        hidden_dim=head.hidden_dim,
    )
