"""ResNet-50/101 backbones with clustering modules at the downsamplings (Sec. 2.5, Sec. 4.1).

The trunk is timm's ResNet (torchvision-style bottlenecks: the stride sits in the 3x3 conv),
with every BatchNorm frozen and no classifier. Around it, as the authors' code
(its hcformer/modeling/backbone/resnet.py and utils.py):

- a ``ClusteringModule`` at each of the last ``hierarchy_level`` downsamplings into layer2,
  layer3, layer4 (fine/coarse channels 256/512, 512/1024, 1024/2048 at the paper's size). The
  fine feature is the previous stage's output; the coarse feature is the output of the WHOLE
  first bottleneck of the next stage (strided conv, residual add and ReLU), so the stages are
  run block by block: first block, tap, the remaining blocks;
- with ``dcnv2``, in that first bottleneck both the 3x3 stride-2 conv and the 1x1 stride-2
  shortcut projection are modulated deformable convs (``hcformer.models.dcn``);
- the stem (conv 7x7 + max-pool) is never clustered.

``output_stride=8`` dilates layer3 (x2) and layer4 (x4) instead of striding them (the per-pixel
baselines of App. E.1); it has no downsampling to cluster, so it needs ``hierarchy_level=0``.
"""

from __future__ import annotations

from collections.abc import Iterable

import timm
from timm.models.resnet import ResNet, downsample_conv
from torch import Tensor, nn

from hcformer.config import BackboneConfig
from hcformer.families import BackboneEntry
from hcformer.models.backbones.common import (
    FEATURE_NAMES,
    Backbone,
    BackboneOutput,
    check_input,
    rename_keys,
    strip_prefixes,
    timm_trunk,
)
from hcformer.models.clustering import ClusteringModule
from hcformer.models.dcn import ModulatedDeformConv2d
from hcformer.models.frozen_bn import FrozenBatchNorm2d

# Stages whose first block downsamples, in order fine to coarse; a module at the last L of them.
CLUSTERED_STAGES = ("layer2", "layer3", "layer4")
STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(Backbone):
    """A timm ResNet trunk with clustering modules (eq. 3) and DCNv2 at its downsamplings.

    Arguments:
      trunk: a timm ``ResNet`` with bottleneck blocks (no classifier needed; its stem and
        ``layer1..layer4`` are adopted under the same names, so ResNet checkpoints load as is).
      hierarchy_level: L, the number of clustering modules, at the last L of the downsamplings
        into layer2, layer3, layer4 (0-3).
      dcnv2: make the downsampling convs of the clustered stages DCNv2 (App. E.2).
      cluster_dim: C_F of the clustering modules.
      scale_init: initial s(i) of the clustering modules.

    ``out_channels`` / ``strides`` map ``res2..res5`` to channels and strides; ``clustering``
    holds the modules by stage name (``layer2``...).
    """

    ignorable_prefixes = ("fc.",)  # the classifier

    def __init__(
        self,
        *,
        trunk: ResNet,
        hierarchy_level: int,
        dcnv2: bool,
        cluster_dim: int = 128,
        scale_init: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 <= hierarchy_level <= len(CLUSTERED_STAGES):
            raise ValueError(f"hierarchy_level must be in 0..3, got {hierarchy_level}")
        self.conv1 = trunk.conv1
        self.bn1 = trunk.bn1
        self.act1 = trunk.act1
        self.maxpool = trunk.maxpool
        for name in STAGES:
            self.add_module(name, getattr(trunk, name))
        info = {i["module"]: i for i in trunk.feature_info}
        self.out_channels = {f: info[s]["num_chs"] for f, s in zip(FEATURE_NAMES, STAGES)}
        self.strides = {f: info[s]["reduction"] for f, s in zip(FEATURE_NAMES, STAGES)}
        self.hierarchy_level = hierarchy_level

        clustered = CLUSTERED_STAGES[len(CLUSTERED_STAGES) - hierarchy_level :]
        self.clustering = nn.ModuleDict()
        for prev, name in zip(STAGES[:-1], STAGES[1:]):
            if name not in clustered:
                continue
            first = getattr(self, name)[0]
            if first.stride != 2:
                raise ValueError(f"{name} does not downsample (dilated trunk): nothing to cluster")
            self.clustering[name] = ClusteringModule(
                fine_channels=info[prev]["num_chs"],
                coarse_channels=info[name]["num_chs"],
                cluster_dim=cluster_dim,
                scale_init=scale_init,
            )
            if dcnv2:
                first.conv2 = ModulatedDeformConv2d.from_conv(first.conv2)
                first.downsample[0] = ModulatedDeformConv2d.from_conv(first.downsample[0])

    def forward(self, x: Tensor) -> BackboneOutput:
        """``x``: normalised images ``[B, 3, H, W]``, H and W multiples of 32."""
        check_input(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        features = {"res2": x}
        assignments: list[Tensor] = []
        scales: list[Tensor] = []
        for feature, name in zip(FEATURE_NAMES[1:], STAGES[1:]):
            blocks = getattr(self, name)
            fine = x
            x = blocks[0](fine)
            if name in self.clustering:
                module = self.clustering[name]
                assignments.append(module(fine, x))
                scales.append(module.scale)
            for block in blocks[1:]:
                x = block(x)
            features[feature] = x
        return BackboneOutput(features=features, assignments=assignments, cluster_scales=scales)

    def state_from_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return resnet_state_from_checkpoint(state)


def _narrow_stem(trunk: ResNet, stem_width: int) -> list[nn.Module]:
    """Give a timm ResNet a ``stem_width``-channel 7x7 stem (timm fixes the plain stem at 64
    channels): a narrower stem conv and BN, and layer1's first block re-wired for that input
    (its 1x1 conv and shortcut projection, made with timm's own ``downsample_conv``). Returns
    the modules that hold new, untrained weights (no checkpoint has them at this width)."""
    block = trunk.layer1[0]
    out_channels = block.conv3.out_channels
    trunk.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1 = FrozenBatchNorm2d(stem_width)
    block.conv1 = nn.Conv2d(stem_width, block.conv1.out_channels, kernel_size=1, bias=False)
    block.downsample = None
    if stem_width != out_channels:
        block.downsample = downsample_conv(
            stem_width, out_channels, kernel_size=1, norm_layer=FrozenBatchNorm2d
        )
    trunk.feature_info[0]["num_chs"] = stem_width
    fresh = [trunk.conv1, block.conv1]
    return fresh + (list(block.downsample.modules()) if block.downsample is not None else [])


def _init_fan_in(modules: Iterable[nn.Module]) -> None:
    """He-normal init with ``fan_in`` of the convs among ``modules`` (timm uses ``fan_out``).

    A randomly initialised trunk has nothing to normalise with: its frozen BatchNorms are the
    identity, so nothing undoes a conv's change of scale. With ``fan_out`` each bottleneck's
    1x1 expansion (fan_out = 4x fan_in) shrinks activations, about 2x per stage: res5 came out
    at 0.04 std on normalised images, and the head's queries started from features that barely
    moved them (the tiny HCFormer's queries stayed class slots that ignored the image; see
    docs/tiny-scale.md). ``fan_in`` keeps the scale (res5 about 0.4 std). Pretrained weights
    replace this init.
    """
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")


def create_resnet_trunk(
    name: str,
    *,
    depths: list[int],
    widths: list[int],
    stem_width: int,
    output_stride: int,
    drop_path: float,
    pretrained: bool = False,
    pretrained_file: str | None = None,
) -> ResNet:
    """timm's ``name`` ResNet with frozen BN, no classifier, optionally shrunk or dilated.

    ``zero_init_last`` is off: with frozen BN a zero-initialised last BN weight would stay zero
    and silence every residual branch of a randomly initialised network; for the same reason a
    random init is He ``fan_in`` (:func:`_init_fan_in`), and so are the new convs of a narrowed
    stem under pretrained weights.
    """
    trunk = timm.create_model(
        name,
        pretrained=pretrained,
        # a local checkpoint instead of the hub (timm's own loading and key filters)
        pretrained_cfg_overlay={"file": pretrained_file} if pretrained_file else None,
        layers=tuple(depths),
        channels=tuple(widths),
        num_classes=0,
        global_pool="",
        norm_layer=FrozenBatchNorm2d,
        output_stride=output_stride,
        drop_path_rate=drop_path,
        zero_init_last=False,
    )
    fresh = _narrow_stem(trunk, stem_width) if stem_width != 64 else []
    _init_fan_in(trunk.modules() if not pretrained else fresh)
    del trunk.fc, trunk.global_pool
    return trunk


def resnet_state_from_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision/timm (identity) or detectron2 ResNet keys to this backbone's names."""
    state = strip_prefixes(state, ("module.", "backbone.", "bottom_up."))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if any(k.startswith(("stem.", "res2.")) for k in state):  # detectron2 naming
        state = rename_keys(
            state,
            [
                (r"^stem\.conv1\.norm\.", "bn1."),
                (r"^stem\.conv1\.", "conv1."),
                (r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}."),
                (r"\.shortcut\.norm\.", ".downsample.1."),
                (r"\.shortcut\.", ".downsample.0."),
                (r"\.conv(\d)\.norm\.", r".bn\1."),
                (r"\.conv(\d)_offset\.", r".conv\1.offset_mask."),  # DeformBottleneckBlock
            ],
        )
    return state


def build_resnet(
    cfg: BackboneConfig, entry: BackboneEntry, *, norm_all_features: bool = False
) -> ResNetBackbone:
    """The ResNet of ``cfg`` (the builder of the ResNet family's registry entries): the entry's
    paper size unless the shape keys shrink it; ``norm_all_features`` is for Swin (ResNets have
    no output norms)."""
    del norm_all_features
    shape = entry.shape(cfg)  # depths, widths, stem_width
    trunk = timm_trunk(
        cfg,
        create_resnet_trunk,
        entry.timm_model,
        **shape,
        output_stride=cfg.output_stride,
        drop_path=cfg.drop_path,
    )
    return ResNetBackbone(
        trunk=trunk,
        hierarchy_level=cfg.hierarchy_level,
        dcnv2=cfg.dcnv2,
        cluster_dim=cfg.cluster_dim,
        scale_init=cfg.scale_init,
    )


__all__ = [
    "ResNetBackbone",
    "build_resnet",
    "create_resnet_trunk",
    "resnet_state_from_checkpoint",
]
