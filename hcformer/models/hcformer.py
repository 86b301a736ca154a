"""HCFormer and HCFormer+ (Sec. 2, Fig. 2): clustering in the backbone, a decoder at stride 32.

The backbone clusters pixels hierarchically while it downsamples (eq. 3); the head sees only
the stride-32 features: ``input_proj`` makes the decoder's memory and a separate ``mask_proj``
the mask features, the decoder predicts classes and stride-32 masks (eq. 4), and the masks are
decoded level by level with the soft assignments of the L clustering modules (eq. 5), to stride
32 / 2**L (stride 4 at L = 3; the authors' code decodes only through the modules present and
leaves the masks at that stride: the loss point-samples them there and inference resizes them
once to the padded input). In training every prediction set is decoded (deep supervision,
decoded before the loss as the authors do); in eval only the final one. When the stride-32 map
is small (tiny scale) the training sets are handed to the loss as coefficients over the decoded
one-hot maps of the coarse cells: the same logits, never materialised for every query.

HCFormer+ adds a DETR encoder on the stride-32 map, inside ``backbone`` (see ``encoder.py``).
:func:`build_hcformer` assembles either from the config (the registry's builder of
``model.head.type: hcformer``).
"""

from __future__ import annotations

import torch
from torch import nn

from hcformer.config import ModelConfig
from hcformer.errors import ConfigError
from hcformer.models.backbones import build_backbone
from hcformer.models.build import check_keys, query_decoder, res5_encoder
from hcformer.models.clustering import (
    decode_basis,
    decode_masks,
    masks_from_basis,
    uses_basis,
)
from hcformer.models.encoder import BackboneWithEncoder, TransformerEncoder
from hcformer.models.pixel_decoder import c2_xavier_fill
from hcformer.models.position_encoding import PositionEmbeddingSine
from hcformer.models.transformer_decoder import MaskedAttentionDecoder, StandardDecoder

# ImageNet statistics on the 0..255 scale (the backbones' pretraining).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


class ImageModel(nn.Module):
    """A model of RGB images in 0..255 (HCFormer, MaskFormer, the per-pixel baselines): the
    ImageNet statistics as buffers ``pixel_mean`` and ``pixel_std`` [1, 3, 1, 1] (not saved in
    checkpoints) and :meth:`normalise`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``images`` [B, 3, H, W] (0..255 RGB, H and W multiples of 32), normalise them."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {SIZE_DIVISIBILITY}: "
                "pad the batch to a multiple of 32 first (the data pipeline's job)"
            )
        return (images - self.pixel_mean) / self.pixel_std


def memory_projection(in_channels: int, hidden_dim: int) -> nn.Module:
    """The 1x1 conv that makes the transformer decoder's memory from an ``in_channels`` map, as
    the authors' (Mask2Former's, MaskFormer's) heads: the identity when the map already has the
    decoder's width (HCFormer+, MaskFormer "+ 6 Enc")."""
    if in_channels == hidden_dim:
        return nn.Identity()
    proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
    c2_xavier_fill(proj)
    return proj


class HCFormer(ImageModel):
    """The HCFormer mask-classification model.

    Arguments:
      backbone: a backbone with clustering modules (``build_backbone``);
        ``backbone.out_channels["res5"]`` is the width of its stride-32 map.
      decoder: ``MaskedAttentionDecoder`` or ``StandardDecoder``; maps (memory, position, mask
        features) to stacked class logits and stride-32 mask logits.
      encoder: the HCFormer+ ``TransformerEncoder`` on the stride-32 map, or None (HCFormer).
        It is wrapped with the backbone into the module ``backbone`` (so its parameters are the
        backbone's, trained at the backbone's learning rate, as in the authors' code).
      hidden_dim: width of the decoder's memory (256).
      mask_dim: width of the mask features (256).

    The masks are decoded through every clustering module of ``backbone`` and no further:
    ``pred_masks`` is at stride ``32 / 2**L`` for the backbone's L clustering modules.
    """

    # Training outputs of small coarse maps as coefficients over a basis (``_training_sets``);
    # False decodes every set densely (benchmarks/train_step.py compares the two).
    factorised_training_masks: bool = True

    def __init__(
        self,
        *,
        backbone: nn.Module,
        decoder: nn.Module,
        encoder: TransformerEncoder | None = None,
        hidden_dim: int = 256,
        mask_dim: int = 256,
    ) -> None:
        super().__init__()
        if encoder is not None:
            backbone = BackboneWithEncoder(body=backbone, encoder=encoder)
        self.backbone = backbone
        in_channels = backbone.out_channels["res5"]
        self.input_proj = memory_projection(in_channels, hidden_dim)
        self.mask_proj = nn.Conv2d(in_channels, mask_dim, kernel_size=1)  # never the identity
        c2_xavier_fill(self.mask_proj)
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, normalize=True)
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> dict:
        """``images`` float [B, 3, H, W] RGB in 0..255, H and W multiples of 32.

        Returns the dict of docs/interfaces.md: ``pred_logits`` [B, Q, K+1], ``pred_masks``
        [B, Q, H/s, W/s] at the stride s = 32 / 2**L of the L clustering modules,
        ``aux_outputs`` (training: the earlier prediction sets, held the same way; eval:
        ``[]``), ``assignments`` (fine to coarse) and ``cluster_scales``. In training with
        L >= 1 and a small coarse map the sets hold ``mask_coefficients`` and ``mask_basis``
        instead of ``pred_masks`` (``_training_sets``).
        """
        out = self.backbone(self.normalise(images))
        res5 = out.features["res5"]
        src = self.input_proj(res5)
        mask_features = self.mask_proj(res5)
        logits, masks = self.decoder(src, self.pe_layer(src), mask_features)  # [S, B, Q, ...]

        assignments = list(out.assignments)
        if self.training:
            sets = self._training_sets(logits, masks, assignments)
            final, aux = sets[-1], sets[:-1]
        else:
            final = {
                "pred_logits": logits[-1],
                "pred_masks": decode_masks(masks[-1], assignments),
            }
            aux = []
        return {
            **final,
            "aux_outputs": aux,
            "assignments": assignments,
            "cluster_scales": list(out.cluster_scales),
        }

    def _training_sets(
        self, logits: torch.Tensor, masks: torch.Tensor, assignments: list[torch.Tensor]
    ) -> list[dict]:
        """Every prediction set ``{"pred_logits", "pred_masks"}`` (decoded as in eval), or for a
        small coarse map and L >= 1 ``{"pred_logits", "mask_coefficients", "mask_basis"}``: the
        same decoded logits held as the coarse logits [B, Q, h w] over the decoded one-hot maps of
        the cells [B, h w, H, W] (eq. 5 is linear), so that the loss, which reads the masks at
        a few points, never needs every query's full map (:func:`set_masks` makes them)."""
        stacked = masks.transpose(0, 1)  # [B, S, Q, h, w]
        coarse_size = tuple(stacked.shape[-2:])
        if (
            self.factorised_training_masks
            and assignments  # L = 0: the stride-32 masks are the output, nothing to decode
            and uses_basis(coarse_size, stacked.shape[1] * stacked.shape[2])
        ):
            basis = decode_basis(
                assignments,
                coarse_size,
                batch_size=stacked.shape[0],
                dtype=masks.dtype,
                device=masks.device,
            )
            coefficients = stacked.flatten(-2)
            return [
                {
                    "pred_logits": logits[i],
                    "mask_coefficients": coefficients[:, i],
                    "mask_basis": basis,
                }
                for i in range(len(logits))
            ]
        # All prediction sets in one call: the neighbour weights of each level are computed
        # once for the whole stack.
        decoded = decode_masks(stacked, assignments).unbind(1)
        return [{"pred_logits": logits[i], "pred_masks": decoded[i]} for i in range(len(logits))]


def set_masks(prediction: dict) -> torch.Tensor:
    """The decoded mask logits [B, Q, H, W] (stride 32 / 2**L) of one prediction set of
    :class:`HCFormer`: ``pred_masks``, or ``mask_coefficients`` [B, Q, C] over ``mask_basis``
    [B, C, H, W]."""
    if "pred_masks" in prediction:
        return prediction["pred_masks"]
    return masks_from_basis(prediction["mask_coefficients"], prediction["mask_basis"])


def _check_hcformer(cfg: ModelConfig) -> None:
    head, backbone = cfg.head, cfg.backbone
    check_keys(
        [
            (head.queries >= 1, "model.head.queries", head.queries, "an integer >= 1"),
            (head.decoder_layers >= 1, "model.head.decoder_layers", head.decoder_layers, ">= 1"),
            (head.encoder_layers >= 0, "model.head.encoder_layers", head.encoder_layers, ">= 0"),
            (head.nheads >= 1, "model.head.nheads", head.nheads, ">= 1"),
            (
                head.hidden_dim >= 4 and head.hidden_dim % 4 == 0,
                "model.head.hidden_dim",
                head.hidden_dim,
                "a positive multiple of 4 (two sine encodings of hidden_dim/2 channels)",
            ),
            (head.mask_dim >= 1, "model.head.mask_dim", head.mask_dim, ">= 1"),
            (
                head.dim_feedforward >= 1,
                "model.head.dim_feedforward",
                head.dim_feedforward,
                ">= 1",
            ),
            (
                0.0 <= head.decoder_dropout < 1.0,
                "model.head.decoder_dropout",
                head.decoder_dropout,
                "in [0, 1)",
            ),
            (
                0.0 <= head.encoder_dropout < 1.0,
                "model.head.encoder_dropout",
                head.encoder_dropout,
                "in [0, 1)",
            ),
            (cfg.num_classes >= 1, "model.num_classes", cfg.num_classes, ">= 1"),
            (
                0 <= backbone.hierarchy_level <= 3,
                "model.backbone.hierarchy_level",
                backbone.hierarchy_level,
                "one of 0, 1, 2, 3",
            ),
            (
                backbone.output_stride == 32,
                "model.backbone.output_stride",
                backbone.output_stride,
                "32 for head type 'hcformer' (8 is for the dilated per-pixel baselines)",
            ),
        ]
    )
    if head.hidden_dim % head.nheads:
        raise ConfigError(
            f"model.head.nheads: {head.nheads} does not divide model.head.hidden_dim "
            f"{head.hidden_dim}; expected a divisor of hidden_dim"
        )


def build_hcformer(cfg: ModelConfig) -> HCFormer:
    """HCFormer (``encoder_layers: 0``) or HCFormer+ (``encoder_layers: 6``) from the config.

    Paper sizes (Sec. 4.1 and the authors' configs): d = 256, 8 heads, FFN 2048, 100 queries
    (200 Swin-L COCO), 8 masked decoder layers (9 standard ones in Table III), 6 encoder layers
    for HCFormer+.
    """
    _check_hcformer(cfg)
    head = cfg.head
    backbone = build_backbone(cfg.backbone)
    res5 = backbone.out_channels["res5"]
    encoder = res5_encoder(cfg, TransformerEncoder, res5, head.hidden_dim)
    decoder_cls = MaskedAttentionDecoder if head.decoder == "masked" else StandardDecoder
    return HCFormer(
        backbone=backbone,
        decoder=query_decoder(cfg, decoder_cls),
        encoder=encoder,
        hidden_dim=head.hidden_dim,
        mask_dim=head.mask_dim,
    )
