"""The model families: one registry entry per backbone and per head, in two plain dicts.

Everything the package knows about a backbone (``model.backbone.name``) or a head
(``model.head.type``) sits in its entry: the builder, the kind of a head (mask classification
or per-pixel), the config keys a backbone family reads and what it supports, its token in
experiment ids, its paper size, the paper's ImageNet weights, and its shrink at the tiny scale.
Config validation (:mod:`hcformer.config`), experiment ids and paper settings
(:mod:`hcformer.experiments`), the loss and the evaluation (per-pixel or not), tracking and
``build_model`` ask these dicts and nothing else.

Why a module of its own, beside ``hcformer.config`` rather than inside ``hcformer.models``: the
submitting process (config, experiments, the launcher, the Snakefile) reads the entries and
imports no torch, and importing anything under ``hcformer.models`` imports torch. So an entry
names its builder as ``"module:function"``, imported only when a model is built
(:func:`load`, the one place that turns such a name into code).

Adding a backbone family: its module under ``hcformer/models/backbones/`` with a builder
``build(cfg: BackboneConfig, entry: BackboneEntry, *, norm_all_features: bool) -> Backbone``
(``hcformer/models/backbones/resnet.py:build_resnet`` is one), and one entry in ``BACKBONES``
below; a new size of a family already here is only the entry. Adding a head: its module under
``hcformer/models/`` with ``build(cfg: ModelConfig) -> nn.Module`` that checks its keys first,
and one entry in ``HEADS``.

This module imports nothing else of the package but ``hcformer.errors``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from hcformer.errors import ConfigError

if TYPE_CHECKING:
    from hcformer.config import BackboneConfig


@dataclass(frozen=True)
class BackboneFamily:
    """What the backbones built by one module share.

    Arguments:
      name: the family in messages ("ResNet").
      builder: ``"module:function"``, called as ``function(cfg, entry, norm_all_features=...)``.
      shape_keys: the optional ``model.backbone`` shape keys the family reads (None in a config:
        the entry's paper size); the other families' shape keys must stay None.
      dilatable: ``model.backbone.output_stride: 8`` is possible (dilated last stages, App. E.1).
      dcnv2: ``model.backbone.dcnv2`` applies (DCNv2 at the clustered downsamplings, App. E.2);
        where it does not, experiments set it to its default so that it never splits an id.
    """

    name: str
    builder: str
    shape_keys: tuple[str, ...]
    dilatable: bool = False
    dcnv2: bool = False


@dataclass(frozen=True)
class BackboneEntry:
    """One ``model.backbone.name``.

    Arguments:
      name: the config value.
      token: its part of experiment ids (``coco_panoptic/hcformer-r50-L3-D8-Q100``).
      family: the module that builds it and what that supports.
      timm_model: timm's architecture the trunk is created as.
      size: the paper's value of each of the family's shape keys.
      pretrained: the ImageNet weights the paper starts from, ``"timm:<name>"`` (resolved by
        :mod:`hcformer.pretrained`); the paper scale's ``model.backbone.pretrained``.
      tiny: the ``model.backbone`` keys that shrink it at the tiny scale (random init, a few
        channels; ``experiments/scales/tiny.yaml`` applies them with ``tiny_backbones: true``).
      drop_path: the paper's stochastic depth for it where that differs from the dataset's base
        config (None: as the base config).
    """

    name: str
    token: str
    family: BackboneFamily
    timm_model: str
    size: Mapping[str, Any]
    pretrained: str
    tiny: Mapping[str, Any] = field(default_factory=dict)
    drop_path: float | None = None

    def shape(self, cfg: BackboneConfig) -> dict[str, Any]:
        """The family's shape keys for ``cfg``: its value where set, else the paper size."""
        return {
            key: self.size[key] if getattr(cfg, key) is None else getattr(cfg, key)
            for key in self.family.shape_keys
        }

    def paper_settings(self) -> dict[str, Any]:
        """The per-backbone part of the paper's configs (applied after the dataset's base)."""
        settings: dict[str, Any] = {"pretrained": self.pretrained}
        if self.drop_path is not None:
            settings["drop_path"] = self.drop_path
        return {"model": {"backbone": settings}}


@dataclass(frozen=True)
class HeadEntry:
    """One ``model.head.type``.

    Arguments:
      type: the config value (also its part of experiment ids).
      kind: ``"mask"`` (mask classification: queries, Hungarian matching, ``pred_logits`` and
        ``pred_masks``) or ``"per_pixel"`` (``sem_logits``, a per-pixel cross-entropy; its HC
        version replaces the backbone's last downsamplings by clustering modules, App. E.1).
      builder: ``"module:function"``, called as ``function(cfg.model)``.
    """

    type: str
    kind: Literal["mask", "per_pixel"]
    builder: str

    @property
    def per_pixel(self) -> bool:
        return self.kind == "per_pixel"


RESNET = BackboneFamily(
    name="ResNet",
    builder="hcformer.models.backbones.resnet:build_resnet",
    shape_keys=("depths", "widths", "stem_width"),
    dilatable=True,
    dcnv2=True,
)
SWIN = BackboneFamily(
    name="Swin",
    builder="hcformer.models.backbones.swin:build_swin",
    shape_keys=("depths", "embed_dim", "num_heads", "window_size"),
)


def _resnet(name: str, token: str, depths: list[int], tiny_depths: list[int]) -> BackboneEntry:
    """A torchvision ResNet (bottleneck widths 64..512, stem 64) with torchvision's ImageNet
    weights (detectron2's R-50/R-101.pkl); tiny: widths 16..128, stem 8."""
    return BackboneEntry(
        name=name,
        token=token,
        family=RESNET,
        timm_model=name,
        size={"depths": depths, "widths": [64, 128, 256, 512], "stem_width": 64},
        pretrained=f"timm:{name}.tv_in1k",
        tiny={"depths": tiny_depths, "widths": [16, 32, 64, 128], "stem_width": 8},
    )


SwinSize = tuple[int, list[int], list[int], int]  # embed_dim, depths, num_heads, window_size


def _swin(name: str, token: str, weights: str, size: SwinSize, tiny: SwinSize) -> BackboneEntry:
    """A Swin from timm's ``<architecture>.<tag>`` weights; ``size`` and ``tiny`` are
    (embed_dim, depths, num_heads, window_size); drop path 0.3 as the authors' Swin configs."""
    keys = ("embed_dim", "depths", "num_heads", "window_size")
    return BackboneEntry(
        name=name,
        token=token,
        family=SWIN,
        timm_model=weights.split(".")[0],
        size=dict(zip(keys, size)),
        pretrained=f"timm:{weights}",
        tiny=dict(zip(keys, tiny)),
        drop_path=0.3,
    )


# The paper's backbones: sizes of torchvision's ResNets and of the authors' Swin configs, the
# ImageNet weights of Mask2Former (Swin-S on ImageNet-1K at 224, Swin-L on ImageNet-22K at 384;
# docs/fidelity.md D3). One line each; a new size of a family is one more line.
BACKBONES: dict[str, BackboneEntry] = {
    entry.name: entry
    for entry in (
        _resnet("resnet50", "r50", [3, 4, 6, 3], tiny_depths=[1, 1, 1, 1]),
        _resnet("resnet101", "r101", [3, 4, 23, 3], tiny_depths=[1, 1, 2, 1]),
        _swin("swin_s", "swins", "swin_small_patch4_window7_224.ms_in1k",
              (96, [2, 2, 18, 2], [3, 6, 12, 24], 7), (16, [1, 1, 1, 1], [1, 2, 4, 8], 4)),
        _swin("swin_l", "swinl", "swin_large_patch4_window12_384.ms_in22k",
              (192, [2, 2, 18, 2], [6, 12, 24, 48], 12), (32, [1, 1, 2, 1], [1, 2, 4, 8], 4)),
    )
}  # fmt: skip

HEADS: dict[str, HeadEntry] = {
    entry.type: entry
    for entry in (
        HeadEntry("hcformer", "mask", "hcformer.models.hcformer:build_hcformer"),
        HeadEntry("maskformer", "mask", "hcformer.models.maskformer:build_maskformer"),
        HeadEntry("fcn32s", "per_pixel", "hcformer.models.perpixel:build_perpixel"),
        HeadEntry("fpn", "per_pixel", "hcformer.models.perpixel:build_perpixel"),
        HeadEntry("pspnet", "per_pixel", "hcformer.models.perpixel:build_perpixel"),
        HeadEntry("deeplabv3", "per_pixel", "hcformer.models.perpixel:build_perpixel"),
    )
}


def backbone_entry(name: str) -> BackboneEntry:
    """The entry of ``model.backbone.name`` ``name``; ConfigError listing the registered ones."""
    if name not in BACKBONES:
        raise ConfigError(
            f"model.backbone.name: {name!r} is not registered; registered: {list(BACKBONES)}"
        )
    return BACKBONES[name]


def head_entry(head_type: str) -> HeadEntry:
    """The entry of ``model.head.type`` ``head_type``; ConfigError listing the registered ones."""
    if head_type not in HEADS:
        raise ConfigError(
            f"model.head.type: {head_type!r} is not registered; registered: {list(HEADS)}"
        )
    return HEADS[head_type]


def load(builder: str) -> Callable[..., Any]:
    """The function that ``"module:function"`` names (importing its module, with torch)."""
    module, _, name = builder.partition(":")
    return getattr(importlib.import_module(module), name)
