"""Modulated deformable convolution (DCNv2) for the downsamplings that carry a clustering module.

Sec. 2.5 / App. E.2: the strided convolutions whose outputs are the coarse pixels of a
clustering module become DCNv2 (Zhu et al. 2019), so the network can choose which pixels to
sample. As the authors' code (implementation-notes.md, "DCNv2 downsampling"):

- offsets and modulation mask come from a plain 3x3 conv with the DCN's stride, padding 1 and
  ``3 * k * k`` outputs (27 for a 3x3 DCN, 3 for a 1x1), weights and bias zero-initialised, so
  at init the offsets are 0 and the mask is ``sigmoid(0) = 0.5``;
- the DCN has a bias, zero-initialised; the weight is copied from the plain conv it replaces
  (its pretrained value, or its random init);
- it runs in fp32 under autocast (AMP) and hands its output on in the input's dtype.

The deformable sampling itself is ``torchvision.ops.deform_conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """A DCNv2 layer that predicts its own offsets and mask from its input.

    Arguments:
      in_channels: channels of the input.
      out_channels: channels of the output.
      kernel_size: k of the k x k deformable kernel (3 for the bottleneck conv, 1 for the
        shortcut projection).
      stride: stride of the DCN and of its offset conv.
      padding: padding of the DCN (the offset conv always uses padding 1 with its 3x3 kernel).
      dilation: dilation of the DCN.

    Parameters ``weight`` ``[out, in, k, k]`` and ``bias`` ``[out]`` are named as an
    ``nn.Conv2d``'s, so a checkpoint of the plain network loads into them; ``offset_mask`` is the
    offset/mask predictor (new, not in any ImageNet checkpoint).

    Cost, in multiply-adds (fvcore's convention): ``deform_conv2d`` does the work of a plain conv
    of the same shape, ``B * out * H_out * W_out * in * k * k`` (bilinear sampling and the mask
    are element-wise), plus ``offset_mask``, an ordinary ``nn.Conv2d`` that counters see.
    FlopCounterMode does not know ``torchvision::deform_conv2d``: register that formula.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.offset_mask = nn.Conv2d(
            in_channels, 3 * kernel_size * kernel_size, kernel_size=3, stride=stride, padding=1
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConv2d:
        """The DCN that replaces ``conv`` (square kernel, no groups), with its weight copied in."""
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(
                f"ModulatedDeformConv2d.from_conv: expected a square ungrouped conv, got {conv}"
            )
        dcn = cls(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size[0],
            stride=conv.stride[0],
            padding=conv.padding[0],
            dilation=conv.dilation[0],
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            dcn.weight.copy_(conv.weight)
            if conv.bias is not None:
                dcn.bias.copy_(conv.bias)
        return dcn

    def forward(self, x: Tensor) -> Tensor:
        # Autocast has no "meta" device type; shape-only passes (FLOP counting) use the CPU's.
        device_type = "cpu" if x.device.type == "meta" else x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            dtype = x.dtype
            x = x.float()
            om = self.offset_mask
            out = F.conv2d(x, om.weight.float(), om.bias.float(), om.stride, om.padding)
            # Channel layout as detectron2/mmcv's ModulatedDeformConv: [o1 | o2 | mask].
            o1, o2, mask = torch.chunk(out, 3, dim=1)
            out = deform_conv2d(
                x,
                torch.cat((o1, o2), dim=1),
                self.weight.float(),
                self.bias.float(),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=mask.sigmoid(),
            )
        return out.to(dtype)  # computed in fp32, handed on in the caller's precision

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
