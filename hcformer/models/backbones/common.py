"""What every backbone is and returns, creating its timm trunk, and reading pretrained
checkpoints (shared by every backbone family)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hcformer.config import BackboneConfig
from hcformer.errors import HCFormerError
from hcformer.models.clustering import ClusteringModule
from hcformer.models.dcn import ModulatedDeformConv2d
from hcformer.pretrained import TIMM_PREFIX, local_weights

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


class BackboneOutput(NamedTuple):
    """The output of a backbone's forward.

    Attributes:
      features: ``res2..res5`` feature maps ``[B, C, H/s, W/s]`` (NCHW) at the strides in the
        backbone's ``strides`` (4, 8, 16, 32; a dilated ResNet keeps res4/res5 at stride 8).
      assignments: the soft assignments of eq. (3), one ``[B, 9, h, w]`` per clustering module,
        fine to coarse (``h, w`` = the fine map's size); ``len == hierarchy_level``.
      cluster_scales: the trainable scalars s(i) of those modules (0-d tensors), same order.
    """

    features: dict[str, Tensor]
    assignments: list[Tensor]
    cluster_scales: list[Tensor]


class Backbone(nn.Module):
    """What the heads rely on: ``forward(x) -> BackboneOutput`` for normalised images
    ``[B, 3, H, W]`` (H, W multiples of 32), ``out_channels`` and ``strides`` over
    ``res2..res5``, and ``hierarchy_level`` (the number of clustering modules)."""

    out_channels: dict[str, int]
    strides: dict[str, int]
    hierarchy_level: int

    # Checkpoint keys a pretrained file may hold that the backbone does not use (a classifier).
    ignorable_prefixes: tuple[str, ...] = ()

    def forward(self, x: Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_from_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A pretrained checkpoint's tensors under this backbone's key names."""
        raise NotImplementedError  # pragma: no cover - abstract

    def new_parameter_prefixes(self) -> list[str]:
        """Key prefixes of what no ImageNet checkpoint holds: the clustering modules and the
        DCNs' offset convs and biases."""
        prefixes = []
        for name, module in self.named_modules():
            if isinstance(module, ClusteringModule):
                prefixes.append(f"{name}.")
            elif isinstance(module, ModulatedDeformConv2d):
                prefixes += [f"{name}.offset_mask.", f"{name}.bias"]
        return prefixes


def timm_trunk(
    cfg: BackboneConfig, create: Callable[..., nn.Module], name: str, **shape
) -> nn.Module:
    """``create(name, pretrained=False, pretrained_file=None, **shape)``: a family's timm trunk.

    With ``cfg.pretrained = "timm:<weights>"`` it is created as timm's ``<weights>`` with its
    pretrained weights, from the weights folder when it holds them (no network needed, see
    :mod:`hcformer.pretrained`); an error of timm's then names the key and the weights.
    """
    weights = cfg.pretrained[len(TIMM_PREFIX) :] if cfg.pretrained.startswith(TIMM_PREFIX) else ""
    local = local_weights(weights) if weights else None
    try:
        return create(
            weights or name,
            pretrained=bool(weights),
            pretrained_file=str(local) if local is not None else None,
            **shape,
        )
    except Exception as exc:
        if not weights:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HCFormerError(
            f"model.backbone.pretrained: {cfg.pretrained!r}: timm could not build or load these "
            f"weights for {cfg.name!r} ({type(exc).__name__}: {first})"
        ) from None


def check_input(x: Tensor, multiple: int = 32) -> None:
    """Backbones take ``[B, 3, H, W]`` with H, W multiples of 32 (eq. 5 needs even sizes)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"backbone input: expected [B, 3, H, W], got {list(x.shape)}")
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(
            f"backbone input: H and W must be multiples of {multiple} (pad the image), "
            f"got {x.shape[-2]}x{x.shape[-1]}"
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file with ``torch.load(weights_only=True)`` and return its tensors.

    Accepts a bare state dict or a training checkpoint wrapping one under ``model``,
    ``state_dict`` or ``model_state`` (timm, torchvision, detectron2 ``.pth``, Swin releases).
    Raises ``HCFormerError`` naming the file if it is missing, unreadable or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise HCFormerError(
            f"{path}: pretrained weights file not found (model.backbone.pretrained)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is the file's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HCFormerError(
            f"{path}: cannot read pretrained weights with torch.load(weights_only=True): {first}"
        ) from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise HCFormerError(f"{path}: expected a state dict (a mapping of names to tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise HCFormerError(f"{path}: holds no tensors; expected a state dict of the backbone")
    return tensors


def strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Drop wrapper prefixes (``module.`` of DDP, ``backbone.`` of detectron2) where present."""
    out = state
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
        elif any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def rename_keys(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply regex substitutions ``(pattern, replacement)`` to every key, in order."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


class LoadReport(NamedTuple):
    """What ``load_pretrained`` did."""

    loaded: list[str]  # keys of the module filled from the checkpoint
    new: list[str]  # keys of the module absent from the checkpoint, as expected (new modules)
    ignored: list[str]  # keys of the checkpoint the backbone does not use (classifier, ...)


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    *,
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    new_prefixes: list[str],
    ignorable_prefixes: tuple[str, ...],
) -> LoadReport:
    """Load ``path`` into ``module`` after ``convert`` maps its keys to the module's names.

    Module keys that start with one of ``new_prefixes`` (the clustering modules, DCN offset
    convs and biases, ...) are expected to be missing from the checkpoint, and checkpoint keys
    that start with one of ``ignorable_prefixes`` (a classifier, a final norm) to be unused. Any
    other missing or unused key, or a shape mismatch, is an ``HCFormerError`` naming the file
    and the first offending keys, raised before anything is loaded: a checkpoint of another
    architecture (e.g. ResNet-101 weights for a ResNet-50) must not be half-loaded silently.
    """
    state = convert(read_state_dict(path))
    own = module.state_dict()
    bad_shapes = [
        f"{k} {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad_shapes:
        shown = "; ".join(bad_shapes[:5])
        raise HCFormerError(
            f"{path}: {len(bad_shapes)} tensors have the wrong shape for this backbone: {shown}"
        )
    absent = [k for k in own if k not in state]
    new = [k for k in absent if k.startswith(tuple(new_prefixes))]
    missing = [k for k in absent if k not in new]
    unused = [k for k in state if k not in own]
    ignored = [k for k in unused if k.startswith(ignorable_prefixes)]
    unexpected = [k for k in unused if k not in ignored]
    if missing or unexpected:
        raise HCFormerError(
            f"{path}: not a checkpoint of this backbone: {len(missing)} of its weights are "
            f"missing (e.g. {', '.join(missing[:6]) or 'none'}) and {len(unexpected)} keys are "
            f"unknown to it (e.g. {', '.join(unexpected[:6]) or 'none'})"
        )
    module.load_state_dict(state, strict=False)
    loaded = [k for k in own if k in state]
    return LoadReport(loaded=loaded, new=new, ignored=ignored)
