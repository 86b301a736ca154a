"""Modulated deformable convolution (DCNv2) for the downsamplings that carry a clustering module.

Sec. 2.5 / App. E.2: the strided convolutions whose outputs are the coarse pixels of a
clustering module become DCNv2 (Zhu et al. 2019), so the network can choose which pixels to
sample. As the authors' code (``DeformConv`` in its hcformer/modeling/backbone/utils.py):

- offsets and modulation mask come from a plain 3x3 conv with the DCN's stride, padding 1 and
  ``3 * k * k`` outputs (27 for a 3x3 DCN, 3 for a 1x1), weights and bias zero-initialised, so
  at init the offsets are 0 and the mask is ``sigmoid(0) = 0.5``;
- the DCN has a bias, zero-initialised; the weight is copied from the plain conv it replaces
  (its pretrained value, or its random init);
- it runs in fp32 under autocast (AMP) and hands its output on in the input's dtype.

The deformable sampling itself is ``torchvision.ops.deform_conv2d`` for inference on GPUs (and
on the meta device, where FLOP counters see it); on CPUs, and on GPUs in training,
:func:`sampled_deform_conv2d`, the same arithmetic as bilinear ``grid_sample`` of the k x k
shifted grids followed by one matrix product (7-13x faster than torchvision's CPU kernel,
forward and backward, at the tiny scale's shapes; on a GPU its backward is faster too, see
``_sampler``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


def sampled_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    stride: int,
    padding: int,
    dilation: int,
    mask: Tensor,
    contract=None,
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` (one offset group, modulated) as ``grid_sample``.

    Output pixel ``(i, j)`` reads, for each kernel tap ``t = (u, v)``, the input at
    ``(i * stride - padding + u * dilation + dy_t, j * stride - padding + v * dilation + dx_t)``
    bilinearly, zero outside the image (torchvision's convention: ``offset[:, 2t]`` is dy,
    ``offset[:, 2t + 1]`` is dx), scales it by ``mask[:, t]`` and contracts channels and taps
    with ``weight``. ``grid_sample`` with ``align_corners=False`` maps the normalised coordinate
    ``(2p + 1) / size - 1`` back to pixel ``p``, and its zero padding drops the same corners.
    ``contract`` (default :func:`contract_taps`) is the final product over channels and taps.
    """
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    taps = kh * kw
    like = {"device": x.device, "dtype": x.dtype}
    rows = torch.arange(h_out, **like) * stride - padding
    cols = torch.arange(w_out, **like) * stride - padding
    tap_rows = (torch.arange(kh, **like) * dilation).repeat_interleave(kw)
    tap_cols = (torch.arange(kw, **like) * dilation).repeat(kh)
    off = offset.view(b, taps, 2, h_out, w_out)
    py = rows.view(1, 1, h_out, 1) + tap_rows.view(1, taps, 1, 1) + off[:, :, 0]
    px = cols.view(1, 1, 1, w_out) + tap_cols.view(1, taps, 1, 1) + off[:, :, 1]
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    sampled = F.grid_sample(
        x, grid.view(b, taps * h_out, w_out, 2), padding_mode="zeros", align_corners=False
    )
    sampled = sampled.view(b, c, taps, h_out, w_out) * mask.view(b, 1, taps, h_out, w_out)
    contract = contract or contract_taps
    out = contract(weight.reshape(c_out, c * taps), sampled.view(b, c * taps, -1))
    return out.view(b, c_out, h_out, w_out) + bias.view(1, -1, 1, 1)


def contract_taps(weight: Tensor, sampled: Tensor) -> Tensor:
    """``weight [O, K] @ sampled [B, K, N] -> [B, O, N]`` (K = channels x taps).

    ``torch.bmm`` over the expanded weight: ``torch.matmul``'s broadcast computes the same
    products but folds the batch into the rows through a transposed copy of ``sampled``, forward
    and backward (the DCN 1.2-1.9x slower at the tiny scale's shapes, the whole training step
    1.02x: ``benchmarks/train_step.py``, variant ``broadcast_matmul_dcn``).
    """
    return torch.bmm(weight.unsqueeze(0).expand(sampled.shape[0], -1, -1), sampled)


class _ContractTapsTF32(torch.autograd.Function):
    """:func:`contract_taps` with its products, forward and backward, in TF32 on CUDA."""

    @staticmethod
    def forward(ctx, weight: Tensor, sampled: Tensor) -> Tensor:
        ctx.save_for_backward(weight, sampled)
        with tf32_products():
            return contract_taps(weight, sampled)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, sampled = ctx.saved_tensors
        d_weight = d_sampled = None
        with tf32_products():
            if ctx.needs_input_grad[0]:
                d_weight = torch.bmm(grad, sampled.transpose(1, 2)).sum(0)
            if ctx.needs_input_grad[1]:
                d_sampled = contract_taps(weight.t(), grad)
        return d_weight, d_sampled


@contextlib.contextmanager
def tf32_products(enabled: bool = True) -> Iterator[None]:
    """Within the block, float32 matrix products may use TF32 (``enabled``) or not; the
    setting before the block is restored after it."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def contract_taps_tf32(weight: Tensor, sampled: Tensor) -> Tensor:
    """:func:`contract_taps` whose products (forward and backward) run in TF32 on CUDA, as
    cuDNN runs the network's ordinary convolutions by PyTorch's default (``cudnn.allow_tf32``);
    the DCN is a convolution too. Same values on the CPU, where TF32 does not exist."""
    return _ContractTapsTF32.apply(weight, sampled)


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
            sample = _sampler(x, self.weight)
            out = sample(
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


def _sampler(x: Tensor, weight: Tensor):
    """The deformable convolution for this call. On the CPU ``sampled_deform_conv2d``. On a GPU
    when gradients flow (training) the same with TF32 products: measured on an H200 at
    HCFormer-R50's six DCNs, batch 16 at 1024x1024, forward+backward 46 ms against 79 ms for
    torchvision's kernel (whose backward scatters columns back with atomics in fp32). Otherwise
    (inference) ``torchvision.ops.deform_conv2d``: 1.6 ms at batch 1, 800x1216, against 4.8 ms
    for the sampled form."""
    if x.device.type == "cpu":
        return sampled_deform_conv2d
    if x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return functools.partial(sampled_deform_conv2d, contract=contract_taps_tf32)
    return deform_conv2d
