"""Swin-S / Swin-L backbones with clustering modules at the patch mergings (Sec. 4.1).

The trunk is timm's ``SwinTransformer`` (its patch embedding and four stages, adopted under the
same names so Swin checkpoints load as is; no classifier). Around it, as the authors' code
(its hcformer/modeling/backbone/hcswin.py and utils.py):

- a ``ClusteringModule`` at the downsampling out of stage i (i = 0, 1, 2) when
  ``3 - i <= hierarchy_level``. Fine = the output of stage i before any output norm;
  coarse = the PatchMerging output (LayerNorm(4C) -> Linear(4C, 2C)) at the start of stage i+1;
- only the stride-32 output goes to the head, after its own LayerNorm (``norm3``; as in
  Mask2Former's Swin, this norm is new, not the classifier's final norm of the ImageNet
  checkpoint). res2..res4 are returned as the raw stage outputs, or normed by ``norm0..norm2``
  with ``norm_all_features`` (MaskFormer's Swin, whose FPN reads them).

Any input size divisible by 32 works: timm builds the shifted-window attention masks for the
input at each forward (``strict_img_size=False``) and never shrinks the window to the map
(``always_partition=True``). Where the map is not a multiple of the window, Mask2Former's Swin
pads the normed tokens to a multiple of the window FIRST and shifts the padded map, with the
shift mask computed on the padded map; timm shifts first and pads after, which puts the
wrapped-around rows in the wrong mask region. ``PaddedWindowBlock`` pads first, then lets
timm do the rest, so the windows are Mask2Former's.
"""

from __future__ import annotations

import re

import timm
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    checkpoint_filter_fn,
)
from torch import Tensor, nn

from hcformer.config import BackboneConfig
from hcformer.errors import ConfigError
from hcformer.families import BackboneEntry
from hcformer.models.backbones.common import (
    FEATURE_NAMES,
    Backbone,
    BackboneOutput,
    check_input,
    strip_prefixes,
    timm_trunk,
)
from hcformer.models.clustering import ClusteringModule


class PaddedWindowBlock(SwinTransformerBlock):
    """timm's Swin block with Mask2Former's window padding: pad the normed tokens to a multiple
    of the window before the cyclic shift, then crop (padded tokens are zeros, not masked)."""

    def _attn(self, x: Tensor) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        pad_h = -h % self.window_size[0]
        pad_w = -w % self.window_size[1]
        if not (pad_h or pad_w):
            return super()._attn(x)
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        return super()._attn(x)[:, :h, :w].contiguous()


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


class SwinBackbone(Backbone):
    """A timm Swin trunk with clustering modules (eq. 3) at its patch mergings.

    Arguments:
      trunk: a timm ``SwinTransformer`` built with ``strict_img_size=False`` and
        ``always_partition=True`` (see :func:`create_swin_trunk`).
      hierarchy_level: L, the number of clustering modules, at the last L of the three patch
        mergings (into stages 1, 2, 3).
      cluster_dim: C_F of the clustering modules (128 in the authors' Swin).
      scale_init: initial s(i) (0.1 in the authors' Swin).
      norm_all_features: also LayerNorm res2..res4 (``norm0..norm2``).

    ``clustering`` holds the modules by the stage whose patch merging they sit at
    (``stage1``..``stage3``).
    """

    ignorable_prefixes = ("head.", "norm.")  # the classifier and its final norm

    def __init__(
        self,
        *,
        trunk: SwinTransformer,
        hierarchy_level: int,
        cluster_dim: int = 128,
        scale_init: float = 0.1,
        norm_all_features: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(trunk.layers)
        if not 0 <= hierarchy_level <= num_stages - 1:
            raise ValueError(
                f"hierarchy_level must be in 0..{num_stages - 1}, got {hierarchy_level}"
            )
        self.patch_embed = trunk.patch_embed
        self.layers = trunk.layers
        for block in self.layers.modules():
            if type(block) is SwinTransformerBlock:
                block.__class__ = PaddedWindowBlock  # same state, Mask2Former's padding order
        channels = [info["num_chs"] for info in trunk.feature_info]
        self.out_channels = dict(zip(FEATURE_NAMES, channels))
        self.strides = {f: info["reduction"] for f, info in zip(FEATURE_NAMES, trunk.feature_info)}
        self.hierarchy_level = hierarchy_level
        self.normed = [f for i, f in enumerate(FEATURE_NAMES) if norm_all_features or i == 3]
        for i, feature in enumerate(FEATURE_NAMES):
            if feature in self.normed:
                self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))
        self.clustering = nn.ModuleDict()
        for stage in range(1, num_stages):
            if num_stages - stage <= hierarchy_level:
                self.clustering[f"stage{stage}"] = ClusteringModule(
                    fine_channels=channels[stage - 1],
                    coarse_channels=channels[stage],
                    cluster_dim=cluster_dim,
                    scale_init=scale_init,
                )

    def state_from_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return swin_state_from_checkpoint(state, self)

    def new_parameter_prefixes(self) -> list[str]:
        """The clustering modules and the output norms (new in Mask2Former's Swin too)."""
        norms = [f"{name}." for name, _ in self.named_children() if re.fullmatch(r"norm\d", name)]
        return super().new_parameter_prefixes() + norms

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay, as Mask2Former's optimizer: the
        relative position bias tables (timm's rule, relative to this module)."""
        return {k for k, _ in self.named_parameters() if "relative_position_bias_table" in k}

    def forward(self, x: Tensor) -> BackboneOutput:
        """``x``: normalised images ``[B, 3, H, W]``, H and W multiples of 32."""
        check_input(x)
        x = self.layers[0](self.patch_embed(x))  # NHWC; stage 0 has no patch merging
        stage_outputs = [x]
        assignments: list[Tensor] = []
        scales: list[Tensor] = []
        for stage in range(1, len(self.layers)):
            layer = self.layers[stage]
            fine = x
            x = layer.downsample(fine)
            if f"stage{stage}" in self.clustering:
                module = self.clustering[f"stage{stage}"]
                assignments.append(module(_nchw(fine), _nchw(x)))
                scales.append(module.scale)
            x = layer.blocks(x)
            stage_outputs.append(x)
        features = {}
        for i, (feature, out) in enumerate(zip(FEATURE_NAMES, stage_outputs)):
            if feature in self.normed:
                out = getattr(self, f"norm{i}")(out)
            features[feature] = _nchw(out)
        return BackboneOutput(features=features, assignments=assignments, cluster_scales=scales)


def create_swin_trunk(
    name: str,
    *,
    embed_dim: int,
    depths: list[int],
    num_heads: list[int],
    window_size: int,
    drop_path: float,
    pretrained: bool = False,
    pretrained_file: str | None = None,
) -> SwinTransformer:
    """timm's ``name`` Swin for any input size divisible by 32, without classifier or final
    norm (the backbone owns its output norms)."""
    trunk = timm.create_model(
        name,
        pretrained=pretrained,
        # a local checkpoint instead of the hub (timm's own loading and key filters)
        pretrained_cfg_overlay={"file": pretrained_file} if pretrained_file else None,
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        drop_path_rate=drop_path,
        num_classes=0,
        strict_img_size=False,
        always_partition=True,
    )
    del trunk.head, trunk.norm
    return trunk


def swin_state_from_checkpoint(state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Map a Swin checkpoint (timm layout, or the original/Mask2Former layout where the patch
    merging ends a stage) to this backbone's names, with timm's own converter."""
    state = strip_prefixes(state, ("module.", "backbone."))
    return checkpoint_filter_fn(state, backbone)


def build_swin(
    cfg: BackboneConfig, entry: BackboneEntry, *, norm_all_features: bool = False
) -> SwinBackbone:
    """The Swin of ``cfg`` (the builder of the Swin family's registry entries): the entry's
    paper size unless the shape keys shrink it; ``norm_all_features`` also norms res2..res4."""
    shape = entry.shape(cfg)
    for i, heads in enumerate(cfg.num_heads or ()):  # the paper sizes divide
        if (shape["embed_dim"] * 2**i) % heads:
            raise ConfigError(
                f"model.backbone.num_heads: stage {i} has {shape['embed_dim'] * 2**i} channels, "
                f"not divisible by {heads} heads"
            )
    trunk = timm_trunk(cfg, create_swin_trunk, entry.timm_model, **shape, drop_path=cfg.drop_path)
    return SwinBackbone(
        trunk=trunk,
        hierarchy_level=cfg.hierarchy_level,
        cluster_dim=cfg.cluster_dim,
        scale_init=cfg.scale_init,
        norm_all_features=norm_all_features,
    )
