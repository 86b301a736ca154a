"""FLOPs counted the way the paper counts them, without computing anything.

The paper reports fvcore's count, as the authors' ``tools/analyze_model.py`` (detectron2's
``FlopCountAnalysis``) runs it: one multiply-add = ONE flop; element-wise
ops (add, mul, softmax, sigmoid, batch norm, ...) are ignored; besides matmuls and convolutions
fvcore counts layer/group norm (5 flops per element with an affine, else 4), bilinear upsampling
(4 per output element), nearest upsampling (1), adaptive average pooling (1 per input element)
and grid sampling (4 per output element); ``einsum`` costs its contraction.

We count at PyTorch's dispatch level with :class:`torch.utils.flop_counter.FlopCounterMode`
(which counts a multiply-add as TWO flops, so every total is halved), on ``meta`` or fake
tensors, adding formulas for what it does not see:

- the fvcore ops above (registered in :data:`FVCORE_FORMULAS`);
- ``torchvision::deform_conv2d`` (DCNv2, Sec. 2.5): the multiply-adds of the equivalent
  convolution, ``N * C_out * H_out * W_out * C_in / groups * k_h * k_w``;
- eq. (3) clustering and eq. (5) decoding: the authors' listings use ``einsum``, whose fvcore
  cost is 9 * C * H * W per fine map. Our fast path is element-wise, so ``hcformer.ops``
  registers its primitives as custom operators (``hcformer::local_similarity`` and
  ``hcformer::local_decode``) with exactly that formula in FlopCounterMode's registry
  (``clustering_macs`` / ``decode_macs``); tests/test_profile.py checks the count against the
  listing's einsum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape is not None else 0


def _first(shape: Any) -> Any:
    """The first output's shape for ops that return several tensors (native_layer_norm)."""
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], (tuple, list)):
        return shape[0]
    return shape


# Formulas receive shapes (FlopCounterMode's shape_wrapper) and return FlopCounterMode units,
# i.e. TWICE fvcore's flops, so that one halving at the end gives fvcore's convention.
def _layer_norm_flops(x_shape, normalized_shape, weight=None, *args, out_shape=None, **kw) -> int:
    return 2 * _numel(x_shape) * (5 if weight is not None else 4)


def _group_norm_flops(x_shape, weight=None, *args, out_shape=None, **kw) -> int:
    return 2 * _numel(x_shape) * (5 if weight is not None else 4)


def _bilinear_flops(*args, out_shape=None, **kw) -> int:
    return 2 * 4 * _numel(_first(out_shape))


def _nearest_flops(*args, out_shape=None, **kw) -> int:
    return 2 * _numel(_first(out_shape))


def _adaptive_avg_pool_flops(x_shape, *args, out_shape=None, **kw) -> int:
    return 2 * _numel(x_shape)


def _grid_sampler_flops(*args, out_shape=None, **kw) -> int:
    return 2 * 4 * _numel(_first(out_shape))


def deform_conv2d_flops(x_shape, weight_shape, *args, out_shape=None, **kw) -> int:
    """``torchvision::deform_conv2d``: the equivalent convolution's multiply-adds (x2 units)."""
    return 2 * _numel(out_shape) * _numel(weight_shape[1:])


def _fvcore_formulas() -> dict[Any, Callable[..., int]]:
    formulas: dict[Any, Callable[..., int]] = {
        aten.native_layer_norm: _layer_norm_flops,
        aten.native_group_norm: _group_norm_flops,
        aten.upsample_bilinear2d: _bilinear_flops,
        aten.upsample_nearest2d: _nearest_flops,
        aten._adaptive_avg_pool2d: _adaptive_avg_pool_flops,
        aten.grid_sampler_2d: _grid_sampler_flops,
    }
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)

        formulas[torch.ops.torchvision.deform_conv2d] = deform_conv2d_flops
    except (ImportError, AttributeError):  # pragma: no cover - torchvision is a dependency
        pass
    return formulas


FVCORE_FORMULAS = _fvcore_formulas()


@dataclass
class MacCount:
    """Multiply-adds (= fvcore flops) by operator, plus the paper ops counted by formula."""

    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, other: MacCount) -> None:
        for op, n in other.by_op.items():
            self.by_op[op] = self.by_op.get(op, 0) + n

    def scaled(self, factor: float) -> dict[str, float]:
        return {op: n * factor for op, n in self.by_op.items()}


@contextlib.contextmanager
def count_macs() -> Iterator[MacCount]:
    """Count the multiply-adds (fvcore flops) of everything run inside the block.

    ``with count_macs() as macs: model(x)``; then ``macs.total`` and ``macs.by_op``. Run on
    ``meta`` tensors (or under FakeTensorMode) to count without computing.
    """
    result = MacCount()
    counter = FlopCounterMode(display=False, custom_mapping=FVCORE_FORMULAS)
    with counter:
        yield result
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        result.by_op[str(op)] = result.by_op.get(str(op), 0) + flops // 2
