"""Per-pixel classification models and their hierarchical-clustering versions (App. E.1, Table I).

The baselines classify every pixel of a feature map: FCN-32s (a classifier on the stride-32
map), FPN (FCN-32s on MaskFormer's stride-4 FPN features), PSPNet (pyramid pooling, Zhao et al.
2017) and Deeplabv3 (atrous spatial pyramid pooling, Chen et al. 2017); PSPNet and Deeplabv3
run on the dilated backbone at output stride 8. The HC versions (HC-FCN-32s, HC-PSPNet,
HC-Deeplabv3) put the same head on the undilated stride-32 backbone with clustering modules and
decode the per-pixel class scores through the hierarchy with eq. (5) to stride 4: Sec. 2.2
reads a linear per-pixel classifier as a clustering whose centroids are the class weights, so
its scores are decoded exactly as HCFormer's mask logits are.

Heads (``features`` dict -> class logits):
- :class:`FCNHead` is torchvision's (3x3 conv to in/4 + BN + ReLU + dropout 0.1 + 1x1
  classifier, as mmseg's one-conv FCNHead);
- :class:`PSPHead`: pooling to 1x1, 2x2, 3x3, 6x6 bins, 1x1 conv to in/4 + BN + ReLU each,
  bilinear back, concatenated with the input, 3x3 conv to in/4 + BN + ReLU, dropout 0.1, 1x1
  classifier (PSPNet's widths: 2048 -> 4 x 512 -> 512 for ResNet-101);
- :class:`DeepLabV3Head`: torchvision's ASPP (1x1 conv, 3x3 convs at rates 12, 24, 36, image
  pooling; 256 wide; dropout 0.5) then 3x3 conv + BN + ReLU and a 1x1 classifier (torchvision's
  ``DeepLabHead`` with a configurable width);
- :class:`FPNHead`: MaskFormer's FPN pixel decoder, then a 1x1 classifier (MaskFormer's
  per-pixel baseline).

No auxiliary FCN head on res4: the paper does not mention one, the output contract
(docs/interfaces.md) has no key for it, and its parameters would receive no gradient from the
engine's loss (which DDP rejects).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead as _TorchvisionFCNHead

from hcformer.config import ModelConfig
from hcformer.errors import ConfigError
from hcformer.models.backbones import build_backbone
from hcformer.models.clustering import decode_masks
from hcformer.models.hcformer import ImageModel
from hcformer.models.pixel_decoder import FPNPixelDecoder

PSP_BINS = (1, 2, 3, 6)  # PSPNet's pyramid
ASPP_RATES = (12, 24, 36)  # Deeplabv3's rates at output stride 8


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """FCN's per-pixel classifier on res5 (torchvision's ``FCNHead``: width in_channels / 4).

    Arguments:
      in_channels: channels of res5.
      num_classes: K.
    """

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = _TorchvisionFCNHead(in_channels, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["res5"])


class PSPHead(nn.Module):
    """PSPNet's pyramid pooling module and classifier on res5.

    Arguments:
      in_channels: channels of res5.
      num_classes: K.
      channels: width of each pyramid branch and of the bottleneck (in_channels / 4 in PSPNet).
      bins: output sizes of the adaptive average poolings.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int,
        bins: tuple[int, ...] = PSP_BINS,
    ) -> None:
        super().__init__()
        self.pyramid = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, channels, 1))
            for b in bins
        )
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["res5"]
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
            for branch in self.pyramid
        ]
        y = self.bottleneck(torch.cat([x, *pooled], dim=1))
        return self.classifier(self.dropout(y))


class DeepLabV3Head(nn.Module):
    """Deeplabv3's ASPP head on res5 (torchvision's ``ASPP`` + 3x3 conv + classifier).

    Arguments:
      in_channels: channels of res5.
      num_classes: K.
      channels: width of the ASPP branches and of the 3x3 conv (256).
      rates: dilation rates of the three 3x3 ASPP branches.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: tuple[int, ...] = ASPP_RATES,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, out_channels=channels)
        self.conv = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.conv(self.aspp(features["res5"])))


class FPNHead(nn.Module):
    """MaskFormer's per-pixel baseline: the FPN pixel decoder, then a 1x1 classifier (stride 4).

    Arguments:
      pixel_decoder: a :class:`FPNPixelDecoder` without encoder.
      num_classes: K.
    """

    def __init__(self, *, pixel_decoder: FPNPixelDecoder, num_classes: int) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.classifier = nn.Conv2d(pixel_decoder.out_channels, num_classes, kernel_size=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.pixel_decoder(features)[0])


class PerPixelModel(ImageModel):
    """A per-pixel classification model: backbone, head, and decoding through the hierarchy.

    Arguments:
      backbone: ``build_backbone``'s module (with clustering modules for the HC versions).
      head: maps the backbone's feature dict to class logits [B, K, h, w].
      levels_total: downsamplings from stride 4 to 32 that the logits of a stride-32 head are
        decoded through when the backbone has clustering modules (3).
    """

    def __init__(self, *, backbone: nn.Module, head: nn.Module, levels_total: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.levels_total = levels_total

    def forward(self, images: torch.Tensor) -> dict:
        """``images`` float [B, 3, H, W] RGB in 0..255, H and W multiples of 32.

        Returns ``sem_logits`` [B, K, h, w] at the model's output stride (32 for FCN-32s, 8 for
        the dilated PSPNet/Deeplabv3, 4 for FPN and for every HC version, whose stride-32
        scores are decoded with eq. 5), ``assignments`` (fine to coarse) and ``cluster_scales``.
        """
        out = self.backbone(self.normalise(images))
        logits = self.head(out.features)
        assignments = list(out.assignments)
        if assignments:
            logits = decode_masks(logits, assignments, levels_total=self.levels_total)
        return {
            "sem_logits": logits,
            "assignments": assignments,
            "cluster_scales": list(out.cluster_scales),
        }


# head type -> the output strides its baseline/HC version may run at
_STRIDES = {"fcn32s": (32,), "fpn": (32,), "pspnet": (8, 32), "deeplabv3": (8, 32)}


def check_perpixel_config(cfg: ModelConfig) -> None:
    """Reject combinations that are neither a baseline of Table I nor its HC version."""
    kind, bb = cfg.head.type, cfg.backbone
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes: {cfg.num_classes} is invalid; expected >= 1")
    if cfg.head.pixel_decoder_dim < 1:
        raise ConfigError(
            f"model.head.pixel_decoder_dim: {cfg.head.pixel_decoder_dim} is invalid; expected >= 1"
        )
    if kind not in _STRIDES:
        raise ConfigError(
            f"model.head.type: {kind!r} is not a per-pixel model (valid: {list(_STRIDES)})"
        )
    if bb.output_stride not in _STRIDES[kind]:
        raise ConfigError(
            f"model.backbone.output_stride: {bb.output_stride} is not valid for model.head.type "
            f"{kind!r} (valid: {list(_STRIDES[kind])})"
        )
    if bb.hierarchy_level > 0 and bb.output_stride != 32:
        raise ConfigError(
            f"model.backbone.hierarchy_level: {bb.hierarchy_level} needs the undilated backbone, "
            f"but model.backbone.output_stride is {bb.output_stride}: the HC version of "
            f"{kind!r} uses output_stride 32 (the dilated stride-8 baseline uses hierarchy_level 0)"
        )
    if kind == "fpn" and bb.hierarchy_level > 0:
        raise ConfigError(
            f"model.backbone.hierarchy_level: {bb.hierarchy_level} is not valid for "
            "model.head.type 'fpn' (the FPN baseline has no HC version: use 0)"
        )


def build_perpixel(cfg: ModelConfig) -> PerPixelModel:
    """A per-pixel model (``model.head.type`` fcn32s | fpn | pspnet | deeplabv3) from the config.

    The HC versions are the same head types with ``backbone.hierarchy_level > 0`` and
    ``backbone.output_stride: 32``; ``head.pixel_decoder_dim`` is the width of the FPN and of
    the ASPP (256); the FCN and PSP widths are res5's channels / 4, as in FCN/PSPNet.
    """
    check_perpixel_config(cfg)
    kind, k = cfg.head.type, cfg.num_classes
    # The FPN reads res2..res4 too: a Swin backbone norms them as MaskFormer's (ResNets: no-op).
    backbone = build_backbone(cfg.backbone, norm_all_features=kind == "fpn")
    in_channels = backbone.out_channels["res5"]
    dim = cfg.head.pixel_decoder_dim
    if kind == "fcn32s":
        head: nn.Module = FCNHead(in_channels=in_channels, num_classes=k)
    elif kind == "pspnet":
        head = PSPHead(in_channels=in_channels, num_classes=k, channels=in_channels // 4)
    elif kind == "deeplabv3":
        head = DeepLabV3Head(in_channels=in_channels, num_classes=k, channels=dim)
    else:
        decoder = FPNPixelDecoder(
            in_channels=dict(backbone.out_channels), conv_dim=dim, mask_dim=dim
        )
        head = FPNHead(pixel_decoder=decoder, num_classes=k)
    return PerPixelModel(backbone=backbone, head=head)
