"""Backbones with clustering modules: ``build_backbone(cfg)`` turns a ``BackboneConfig`` into one.

Families (``cfg.name``) and their paper sizes:

============  =============================================================================
resnet50      timm ResNet-50, torchvision-style bottlenecks, depths 3-4-6-3, widths 64..512
resnet101     timm ResNet-101, depths 3-4-23-3
swin_s        timm Swin-S: embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7
swin_l        timm Swin-L: embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12
============  =============================================================================

The shape keys of the config (``depths``, ``widths``, ``stem_width`` for ResNets; ``depths``,
``embed_dim``, ``num_heads``, ``window_size`` for Swin) shrink a family for the tiny/smoke scales
without changing the code path. Every backbone's ``forward(x)`` takes normalised images
``[B, 3, H, W]`` (H, W multiples of 32) and returns a :class:`BackboneOutput`; it has
``out_channels`` and ``strides`` (dicts over ``res2..res5``).

``cfg.pretrained``: ``""`` (random init), a local checkpoint file (torch state dict; timm,
torchvision, detectron2 or Swin-release key names), or ``"timm:<model name>"`` (timm's
pretrained weights: ``<name>.safetensors`` in the weights folder of ``hcformer fetch-weights``
when it is there, else through huggingface_hub's cache, see :mod:`hcformer.pretrained`;
``PAPER_PRETRAINED`` names the paper's ImageNet weights). The clustering modules, DCN offset
convs and biases, and Swin's output norms are new and are expected to be absent from any
checkpoint; a checkpoint that lacks any other weight of the backbone, or holds weights it does
not know (other than a classifier), is an error.
"""

from __future__ import annotations

import logging
import re

from torch import Tensor, nn

from hcformer.config import BackboneConfig
from hcformer.errors import ConfigError, HCFormerError
from hcformer.models.backbones.common import Backbone, BackboneOutput, LoadReport, load_pretrained
from hcformer.models.backbones.resnet import (
    RESNET_SIZES,
    ResNetBackbone,
    create_resnet_trunk,
    resnet_state_from_checkpoint,
)
from hcformer.models.backbones.swin import (
    SWIN_SIZES,
    SwinBackbone,
    create_swin_trunk,
    swin_state_from_checkpoint,
)
from hcformer.models.clustering import ClusteringModule
from hcformer.models.dcn import ModulatedDeformConv2d

log = logging.getLogger(__name__)


# The ImageNet weights the authors start from (Mask2Former's): torchvision's ResNets, Swin-S
# on ImageNet-1K at 224, Swin-L on ImageNet-22K at 384 (docs/fidelity.md, D3).
PAPER_PRETRAINED = {
    "resnet50": "timm:resnet50.tv_in1k",
    "resnet101": "timm:resnet101.tv_in1k",
    "swin_s": "timm:swin_small_patch4_window7_224.ms_in1k",
    "swin_l": "timm:swin_large_patch4_window12_384.ms_in22k",
}

RESNET_ONLY = ("widths", "stem_width")
SWIN_ONLY = ("embed_dim", "num_heads", "window_size")


def _check_list(cfg: BackboneConfig, key: str, length: int) -> None:
    value = getattr(cfg, key)
    if value is not None and (len(value) != length or any(v < 1 for v in value)):
        raise ConfigError(
            f"model.backbone.{key}: expected {length} positive integers (one per stage), got {value}"
        )


def validate(cfg: BackboneConfig) -> None:
    """Raise ``ConfigError`` naming the key for combinations the backbones cannot build."""
    if not 0 <= cfg.hierarchy_level <= 3:
        raise ConfigError(
            f"model.backbone.hierarchy_level: expected 0..3 (clustering modules at the last L "
            f"of the 3 downsamplings), got {cfg.hierarchy_level}"
        )
    if cfg.cluster_dim < 1:
        raise ConfigError(f"model.backbone.cluster_dim: expected >= 1, got {cfg.cluster_dim}")
    if not 0.0 <= cfg.drop_path < 1.0:
        raise ConfigError(
            f"model.backbone.drop_path: expected a rate in [0, 1), got {cfg.drop_path}"
        )
    for key in ("depths", "widths", "num_heads"):
        _check_list(cfg, key, 4)
    resnet = cfg.name in RESNET_SIZES
    wrong = SWIN_ONLY if resnet else RESNET_ONLY
    for key in wrong:
        if getattr(cfg, key) is not None:
            family = "Swin" if resnet else "ResNet"
            raise ConfigError(
                f"model.backbone.{key}: applies to {family} backbones only, "
                f"not to model.backbone.name {cfg.name!r}"
            )
    if cfg.output_stride not in (8, 32):
        raise ConfigError(
            f"model.backbone.output_stride: expected 8 or 32, got {cfg.output_stride}"
        )
    if cfg.output_stride == 8:
        if not resnet:
            raise ConfigError(
                f"model.backbone.output_stride: 8 (dilated) is for ResNets only, not {cfg.name!r}"
            )
        if cfg.hierarchy_level != 0:
            raise ConfigError(
                "model.backbone.output_stride: 8 dilates layer3/layer4, which then have no "
                "downsampling to cluster; it needs model.backbone.hierarchy_level 0, got "
                f"{cfg.hierarchy_level}"
            )
    for key in ("stem_width", "embed_dim", "window_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.backbone.{key}: expected a positive integer, got {value}")
    if not resnet and cfg.num_heads is not None:
        embed = cfg.embed_dim or SWIN_SIZES[cfg.name]["embed_dim"]
        for i, heads in enumerate(cfg.num_heads):
            if (embed * 2**i) % heads:
                raise ConfigError(
                    f"model.backbone.num_heads: stage {i} has {embed * 2**i} channels, "
                    f"not divisible by {heads} heads"
                )


def build_backbone(cfg: BackboneConfig, *, norm_all_features: bool = False) -> Backbone:
    """The backbone that ``cfg`` describes, with pretrained weights loaded if it names any.

    Arguments:
      cfg: the ``model.backbone`` config.
      norm_all_features: Swin only: also LayerNorm res2..res4 (``norm0..norm2``, as MaskFormer's
        Swin, whose FPN reads them). The HCFormer head reads only res5, so by default only res5
        gets its norm (``norm3``) and the other features are the raw stage outputs.
    """
    validate(cfg)
    timm_name = cfg.pretrained[len("timm:") :] if cfg.pretrained.startswith("timm:") else ""
    try:
        trunk = _create_trunk(cfg, timm_name)
    except Exception as exc:
        if not timm_name:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HCFormerError(
            f"model.backbone.pretrained: {cfg.pretrained!r}: timm could not build or load these "
            f"weights for {cfg.name!r} ({type(exc).__name__}: {first})"
        ) from None
    if cfg.name in RESNET_SIZES:
        backbone: Backbone = ResNetBackbone(
            trunk=trunk,
            hierarchy_level=cfg.hierarchy_level,
            dcnv2=cfg.dcnv2,
            cluster_dim=cfg.cluster_dim,
            scale_init=cfg.scale_init,
        )
        convert = resnet_state_from_checkpoint
        ignorable: tuple[str, ...] = ("fc.",)
    else:
        backbone = SwinBackbone(
            trunk=trunk,
            hierarchy_level=cfg.hierarchy_level,
            cluster_dim=cfg.cluster_dim,
            scale_init=cfg.scale_init,
            norm_all_features=norm_all_features,
        )

        def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return swin_state_from_checkpoint(state, backbone)

        ignorable = ("head.", "norm.")  # the classifier and its final norm

    if cfg.pretrained and not timm_name:
        report = load_pretrained(
            backbone,
            cfg.pretrained,
            convert=convert,
            new_prefixes=new_parameter_prefixes(backbone),
            ignorable_prefixes=ignorable,
        )
        _log_report(cfg.pretrained, report)
    return backbone


def _create_trunk(cfg: BackboneConfig, timm_name: str) -> nn.Module:
    """timm's model for ``cfg`` (the paper's size unless shape keys shrink it); with
    ``timm_name``, that timm model with its pretrained weights (from the weights folder when
    it holds them, which needs no network)."""
    from hcformer.pretrained import local_weights

    local = local_weights(timm_name) if timm_name else None
    pretrained_file = str(local) if local is not None else None
    if cfg.name in RESNET_SIZES:
        size = RESNET_SIZES[cfg.name]
        return create_resnet_trunk(
            timm_name or cfg.name,
            depths=cfg.depths or size["depths"],
            widths=cfg.widths or size["widths"],
            stem_width=cfg.stem_width or size["stem_width"],
            output_stride=cfg.output_stride,
            drop_path=cfg.drop_path,
            pretrained=bool(timm_name),
            pretrained_file=pretrained_file,
        )
    size = SWIN_SIZES[cfg.name]
    return create_swin_trunk(
        timm_name or size["timm_name"],
        embed_dim=cfg.embed_dim or size["embed_dim"],
        depths=cfg.depths or size["depths"],
        num_heads=cfg.num_heads or size["num_heads"],
        window_size=cfg.window_size or size["window_size"],
        drop_path=cfg.drop_path,
        pretrained=bool(timm_name),
        pretrained_file=pretrained_file,
    )


def new_parameter_prefixes(backbone: nn.Module) -> list[str]:
    """Key prefixes of what no ImageNet checkpoint holds: the clustering modules, the DCNs'
    offset convs and biases, and Swin's output norms (new in Mask2Former's Swin too)."""
    prefixes = []
    for name, module in backbone.named_modules():
        if isinstance(module, ClusteringModule):
            prefixes.append(f"{name}.")
        elif isinstance(module, ModulatedDeformConv2d):
            prefixes += [f"{name}.offset_mask.", f"{name}.bias"]
        elif isinstance(backbone, SwinBackbone) and re.fullmatch(r"norm\d", name):
            prefixes.append(f"{name}.")
    return prefixes


def _log_report(path: str, report: LoadReport) -> None:
    log.info(
        "loaded %d tensors from %s; %d new (clustering modules, DCN offsets, output norms); "
        "%d checkpoint keys unused (%s)",
        len(report.loaded),
        path,
        len(report.new),
        len(report.ignored),
        ", ".join(report.ignored[:4]) or "none",
    )


__all__ = [
    "PAPER_PRETRAINED",
    "Backbone",
    "BackboneOutput",
    "LoadReport",
    "ResNetBackbone",
    "SwinBackbone",
    "build_backbone",
    "validate",
]
