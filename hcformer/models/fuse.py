"""Inference fast paths for every model (HCFormer, HCFormer+, MaskFormer, the per-pixel models).

Evaluation and latency only; training never goes through this module, and parameter counts
(``hcformer profile``) are taken on the plain model.

:func:`optimize_for_inference` applies, each optional:

- **BatchNorm folding**: in eval mode a BatchNorm is a per-channel affine map, so one that
  directly follows a convolution is folded into it (``W' = W * s``, ``b' = b * s + t`` with
  ``s = weight / sqrt(running_var + eps)``, ``t = bias - running_mean * s``: torch's
  ``fuse_conv_bn_weights``) and replaced by ``nn.Identity``. That covers the backbones'
  :class:`~hcformer.models.frozen_bn.FrozenBatchNorm2d` (timm bottlenecks ``convN -> bnN``, the
  stem, the ``downsample`` shortcuts) and the per-pixel heads' ``nn.BatchNorm2d`` (PSP, ASPP, FCN
  and the 3x3 convs, all ``nn.Sequential(conv, bn, relu)``), and the DCNv2 convolutions of
  :mod:`hcformer.models.dcn`: a DCN's output is ``sum(W * sampled) + b`` and its offsets come
  from its input, so scaling ``W`` and ``b`` folds the BN there too. GroupNorm and LayerNorm
  (pixel decoder, encoder, Swin) depend on the data and stay.
- **channels-last** memory format for the weights and the input images;
- **autocast** to ``bfloat16``/``float16`` (outputs handed back in float32; the DCNs keep their
  float32 arithmetic, as in training);
- **torch.compile** (any of its modes; ``reduce-overhead`` records CUDA graphs itself);
- **CUDA graphs** of the (eager or compiled) model: :class:`CUDAGraphRunner` captures one graph
  per input shape, with static input and output buffers.

With every option off it returns the model itself, untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from hcformer.models.backbones.resnet import ResNetBackbone
from hcformer.models.dcn import ModulatedDeformConv2d
from hcformer.models.frozen_bn import FrozenBatchNorm2d

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Blocks whose forward applies ``bnN`` directly to ``convN``'s output (timm's ResNet blocks and
# stem, and the backbone that adopts that stem). In ``nn.Sequential`` a BN right after a conv.
NAMED_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    ResNet: (("conv1", "bn1"),),
    ResNetBackbone: (("conv1", "bn1"),),
}


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """What :func:`optimize_for_inference` does (all off: the plain model)."""

    fuse: bool = False  # fold BatchNorms into the preceding convolutions
    channels_last: bool = False  # channels-last weights and inputs
    dtype: str = "float32"  # autocast dtype: float32 (none), bfloat16, float16
    compile: str | None = None  # a torch.compile mode, or None for eager
    cuda_graph: bool = False  # replay one CUDA graph per input shape (CUDA only)

    @property
    def plain(self) -> bool:
        return self == InferenceOptions()


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, ModulatedDeformConv2d) or (
        type(module) is nn.Conv2d and not module.transposed
    )


def _is_foldable_bn(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    # A trainable BatchNorm is an affine map only in eval mode and with running statistics.
    return (
        type(module) is nn.BatchNorm2d
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
    )


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """``(parent, conv_name, bn_name)`` for every BN of ``model`` applied directly to a conv's
    output: consecutive children of an ``nn.Sequential``, or a known block's ``convN``/``bnN``."""
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            names = [name for name, _ in parent.named_children()]
            for conv_name, bn_name in zip(names, names[1:]):
                if _is_conv(parent._modules[conv_name]) and _is_foldable_bn(
                    parent._modules[bn_name]
                ):
                    yield parent, conv_name, bn_name
            continue
        for cls, pairs in NAMED_PAIRS.items():
            if isinstance(parent, cls):
                for conv_name, bn_name in pairs:
                    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
                    if conv is not None and _is_conv(conv) and _is_foldable_bn(bn):
                        yield parent, conv_name, bn_name
                break


def _fold(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval mode) into ``conv``'s weight and bias, in float32, in place."""
    weight = conv.weight
    bias = conv.bias
    ones = torch.ones(bn.num_features, device=weight.device)
    zeros = torch.zeros(bn.num_features, device=weight.device)
    bn_weight = bn.weight if bn.weight is not None else ones
    bn_bias = bn.bias if bn.bias is not None else zeros
    with torch.no_grad():
        new_weight, new_bias = fuse_conv_bn_weights(
            weight.float(),
            None if bias is None else bias.float(),
            bn.running_mean.float(),
            bn.running_var.float(),
            bn.eps,
            bn_weight.float(),
            bn_bias.float(),
        )
    conv.weight = nn.Parameter(
        new_weight.to(weight.dtype).contiguous(memory_format=_memory_format(weight)),
        requires_grad=False,
    )
    conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)


def _memory_format(t: Tensor) -> torch.memory_format:
    is_cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if is_cl and not t.is_contiguous() else torch.contiguous_format


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every BN that directly follows a conv into that conv (in place, eval mode);
    the BN becomes ``nn.Identity``. Returns how many were folded."""
    model.eval()
    pairs = list(conv_bn_pairs(model))
    for parent, conv_name, bn_name in pairs:
        _fold(parent._modules[conv_name], parent._modules[bn_name])
        parent._modules[bn_name] = nn.Identity()
    return len(pairs)


def _to_float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v) for v in out)
    return out


def _clone(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(v) for v in out)
    return out


class InferenceModel(nn.Module):
    """Runs ``model`` on channels-last inputs and/or under autocast; outputs in float32.

    Arguments:
      model: the model (already folded and converted as wanted).
      channels_last: convert the input images to channels-last.
      dtype: the autocast dtype, or ``None`` for none.
    """

    def __init__(self, model: nn.Module, *, channels_last: bool, dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.dtype = dtype

    def forward(self, images: Tensor) -> Any:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.model(images)
        with torch.autocast(images.device.type, dtype=self.dtype):
            out = self.model(images)
        return _to_float32(out)


class CUDAGraphRunner(nn.Module):
    """Replays a CUDA graph of ``model``'s forward, captured once per input shape and dtype.

    The first call with a new shape runs ``warmup`` eager forwards on a side stream (as
    ``torch.cuda.graphs`` requires), then captures one into a memory pool shared by all of this
    runner's graphs; later calls copy the input into the static input and replay. Outputs are
    cloned (the static outputs are overwritten by the next replay). After ``max_graphs`` shapes,
    new shapes run eagerly. Inference only (the forward runs under ``torch.inference_mode``).
    """

    def __init__(self, model: nn.Module, *, warmup: int = 2, max_graphs: int = 32) -> None:
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Any]] = {}
        self._pool = None

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Any:
        if images.device.type != "cuda":
            raise RuntimeError(f"CUDAGraphRunner needs CUDA inputs, got {images.device}")
        key = (tuple(images.shape), tuple(images.stride()), images.dtype, images.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.model(images)
            entry = self._graphs[key] = self._capture(images)
        graph, static_in, static_out = entry
        static_in.copy_(images)
        graph.replay()
        return _clone(static_out)

    def _capture(self, images: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static_in = images.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream(images.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.model(static_in)
        return graph, static_in, static_out


def optimize_for_inference(
    model: nn.Module,
    *,
    fuse: bool = True,
    channels_last: bool = False,
    dtype: str | torch.dtype | None = None,
    compile: str | None = None,
    cuda_graph: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """An eval-mode inference version of ``model`` (see the module docstring).

    Arguments:
      model: any model of :func:`hcformer.models.build_model` (or any module).
      fuse: fold BatchNorms into the preceding convolutions.
      channels_last: channels-last weights and input images.
      dtype: autocast dtype (``"bfloat16"``, ``"float16"``, a ``torch.dtype``); ``None`` or
        ``"float32"``: none.
      compile: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ...), or ``None``.
      cuda_graph: replay CUDA graphs (:class:`CUDAGraphRunner`) around the (compiled) model.
      inplace: modify ``model`` itself; by default a deep copy is changed and ``model`` (its
        parameters, their count, its training flag) is left as it was.

    Returns ``model`` itself (put in eval mode) when every option is off.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float32:
        dtype = None
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"compile: {compile!r} is not one of {list(COMPILE_MODES)}")
    if not (fuse or channels_last or dtype or compile or cuda_graph):
        return model.eval() if inplace else model
    if not inplace and (fuse or channels_last):
        model = copy.deepcopy(model)
    model.eval()
    if fuse:
        fold_batchnorms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out: nn.Module = model
    if channels_last or dtype is not None:
        out = InferenceModel(model, channels_last=channels_last, dtype=dtype)
    if compile is not None:
        out = torch.compile(out, mode=None if compile == "default" else compile)
    if cuda_graph:
        out = CUDAGraphRunner(out)
    return out


def apply_options(model: nn.Module, options: InferenceOptions, *, inplace: bool = False):
    """:func:`optimize_for_inference` with ``options``."""
    return optimize_for_inference(model, inplace=inplace, **dataclasses.asdict(options))
