"""``build_model``: the one builder from the typed config to an assembled model.

Every model family lives in its own file; this file only checks the combination of keys and
dispatches on ``model.head.type`` in one table (``_BUILDERS``). Paper sizes (Sec. 4.1,
implementation notes): d = 256, 8 heads, FFN 2048, 100 queries (200 Swin-L COCO), 8 masked
decoder layers (9 standard ones in Table III), 6 encoder layers for HCFormer+.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hcformer.config import ModelConfig
from hcformer.errors import ConfigError
from hcformer.models.backbones import build_backbone
from hcformer.models.encoder import TransformerEncoder
from hcformer.models.hcformer import HCFormer
from hcformer.models.transformer_decoder import MaskedAttentionDecoder, StandardDecoder


def _check_hcformer(cfg: ModelConfig) -> None:
    head, backbone = cfg.head, cfg.backbone
    checks = [
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
        (head.dim_feedforward >= 1, "model.head.dim_feedforward", head.dim_feedforward, ">= 1"),
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
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is invalid; expected {expected}")
    if head.hidden_dim % head.nheads:
        raise ConfigError(
            f"model.head.nheads: {head.nheads} does not divide model.head.hidden_dim "
            f"{head.hidden_dim}; expected a divisor of hidden_dim"
        )


def _build_hcformer(cfg: ModelConfig) -> nn.Module:
    """HCFormer (``encoder_layers: 0``) or HCFormer+ (``encoder_layers: 6``)."""
    _check_hcformer(cfg)
    head = cfg.head
    backbone = build_backbone(cfg.backbone)
    encoder = None
    if head.encoder_layers > 0:
        encoder = TransformerEncoder(
            in_channels=backbone.out_channels["res5"],
            d_model=head.hidden_dim,
            num_layers=head.encoder_layers,
            nheads=head.nheads,
            dim_feedforward=head.dim_feedforward,
            dropout=head.encoder_dropout,
        )
    decoder_cls = MaskedAttentionDecoder if head.decoder == "masked" else StandardDecoder
    decoder = decoder_cls(
        hidden_dim=head.hidden_dim,
        num_classes=cfg.num_classes,
        num_queries=head.queries,
        num_layers=head.decoder_layers,
        nheads=head.nheads,
        dim_feedforward=head.dim_feedforward,
        dropout=head.decoder_dropout,
        mask_dim=head.mask_dim,
    )
    return HCFormer(
        backbone=backbone,
        decoder=decoder,
        encoder=encoder,
        hidden_dim=head.hidden_dim,
        mask_dim=head.mask_dim,
    )


def _build_maskformer(cfg: ModelConfig) -> nn.Module:
    from hcformer.models.maskformer import build_maskformer

    return build_maskformer(cfg)


def _build_perpixel(cfg: ModelConfig) -> nn.Module:
    """FCN-32s, FPN, PSPNet, Deeplabv3 and their HC versions (App. E.1)."""
    from hcformer.models.perpixel import build_perpixel

    return build_perpixel(cfg)


# The one dispatch table on ``model.head.type``; each family is built in its own file.
_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "hcformer": _build_hcformer,
    "maskformer": _build_maskformer,
    "fcn32s": _build_perpixel,
    "fpn": _build_perpixel,
    "pspnet": _build_perpixel,
    "deeplabv3": _build_perpixel,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Assemble the model that ``cfg`` describes (random init; the backbone may load weights).

    Raises ConfigError naming the key for a head type not built yet or a bad combination.
    Build on the ``meta`` device (``with torch.device("meta"):``) to count parameters fast.
    """
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model expects the model part of the config, got {type(cfg)}")
    builder = _BUILDERS.get(cfg.head.type)
    if builder is None:
        raise ConfigError(
            f"model.head.type: {cfg.head.type!r} is not built yet; built: {sorted(_BUILDERS)}"
        )
    return builder(cfg)
