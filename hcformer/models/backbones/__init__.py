"""Backbones with clustering modules: ``build_backbone(cfg)`` turns a ``BackboneConfig`` into one.

``cfg.name`` names an entry of :data:`hcformer.families.BACKBONES`, which holds the family's
builder (``resnet.py:build_resnet``, ``swin.py:build_swin``), its paper size and its ImageNet
weights:

============  =============================================================================
resnet50      timm ResNet-50, torchvision-style bottlenecks, depths 3-4-6-3, widths 64..512
resnet101     timm ResNet-101, depths 3-4-23-3
swin_s        timm Swin-S: embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7
swin_l        timm Swin-L: embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12
============  =============================================================================

The shape keys of the config (the family's ``shape_keys``: ``depths``, ``widths``,
``stem_width`` for ResNets; ``depths``, ``embed_dim``, ``num_heads``, ``window_size`` for Swin)
shrink a backbone for the tiny/smoke scales without changing the code path. Every backbone's
``forward(x)`` takes normalised images ``[B, 3, H, W]`` (H, W multiples of 32) and returns a
:class:`BackboneOutput`; it has ``out_channels`` and ``strides`` (dicts over ``res2..res5``).

``cfg.pretrained``: ``""`` (random init), a local checkpoint file (torch state dict; timm,
torchvision, detectron2 or Swin-release key names), or ``"timm:<model name>"`` (timm's
pretrained weights: ``<name>.safetensors`` in the weights folder of ``hcformer fetch-weights``
when it is there, else through huggingface_hub's cache, see :mod:`hcformer.pretrained`; an
entry's ``pretrained`` names the paper's ImageNet weights). The clustering modules, DCN offset
convs and biases, and Swin's output norms are new and are expected to be absent from any
checkpoint; a checkpoint that lacks any other weight of the backbone, or holds weights it does
not know (other than a classifier), is an error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from hcformer.config import BackboneConfig
from hcformer.errors import ConfigError
from hcformer.families import BACKBONES, BackboneFamily, backbone_entry, load
from hcformer.models.backbones.common import Backbone, BackboneOutput, LoadReport, load_pretrained

log = logging.getLogger(__name__)


def _check_list(cfg: BackboneConfig, key: str, length: int) -> None:
    value = getattr(cfg, key)
    if value is not None and (len(value) != length or any(v < 1 for v in value)):
        raise ConfigError(
            f"model.backbone.{key}: expected {length} positive integers (one per stage), got {value}"
        )


def _family_names(selected: Callable[[BackboneFamily], bool]) -> str:
    """The registered families that ``selected`` picks, for messages (e.g. "Swin")."""
    return " or ".join(
        dict.fromkeys(e.family.name for e in BACKBONES.values() if selected(e.family))
    )


def validate(cfg: BackboneConfig) -> None:
    """Raise ``ConfigError`` naming the key for combinations the backbones cannot build (what
    every family shares; a family's builder checks its own keys first)."""
    family = backbone_entry(cfg.name).family
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
    shape_keys = {key for e in BACKBONES.values() for key in e.family.shape_keys}
    for key in (f.name for f in dataclasses.fields(cfg)):
        if key in shape_keys - set(family.shape_keys) and getattr(cfg, key) is not None:
            owners = _family_names(lambda f, key=key: key in f.shape_keys)
            raise ConfigError(
                f"model.backbone.{key}: applies to {owners} backbones only, "
                f"not to model.backbone.name {cfg.name!r}"
            )
    if cfg.output_stride not in (8, 32):
        raise ConfigError(
            f"model.backbone.output_stride: expected 8 or 32, got {cfg.output_stride}"
        )
    if cfg.output_stride == 8:
        if not family.dilatable:
            raise ConfigError(
                "model.backbone.output_stride: 8 (dilated) is for "
                f"{_family_names(lambda f: f.dilatable)}s only, not {cfg.name!r}"
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


def build_backbone(cfg: BackboneConfig, *, norm_all_features: bool = False) -> Backbone:
    """The backbone that ``cfg`` describes (its registry entry's builder), with pretrained
    weights loaded if it names any.

    Arguments:
      cfg: the ``model.backbone`` config.
      norm_all_features: Swin only: also LayerNorm res2..res4 (``norm0..norm2``, as MaskFormer's
        Swin, whose FPN reads them). The HCFormer head reads only res5, so by default only res5
        gets its norm (``norm3``) and the other features are the raw stage outputs.
    """
    validate(cfg)
    entry = backbone_entry(cfg.name)
    backbone = load(entry.family.builder)(cfg, entry, norm_all_features=norm_all_features)
    if cfg.pretrained and not cfg.pretrained.startswith("timm:"):
        report = load_pretrained(
            backbone,
            cfg.pretrained,
            convert=backbone.state_from_checkpoint,
            new_prefixes=backbone.new_parameter_prefixes(),
            ignorable_prefixes=backbone.ignorable_prefixes,
        )
        _log_report(cfg.pretrained, report)
    return backbone


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
    "Backbone",
    "BackboneOutput",
    "LoadReport",
    "build_backbone",
    "validate",
]
