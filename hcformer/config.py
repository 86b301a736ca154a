"""The typed configuration of an experiment: one tree of dataclasses, loaded from YAML.

Every key a model, dataset, solver or evaluator reads is declared here once, with its
default, so the meaning of a configuration never spreads over several files (the
counter-example is detectron2's global mutable config node). Unknown or misspelt keys
fail with a message naming the key and the valid ones.

Names follow the paper: ``hierarchy_level`` (number of clustering modules, Sec. 4.1),
``cluster_dim`` (C_F, Sec. 2.2), ``scale_init`` (s(i) of eq. 3), ``decoder_layers``,
``queries``, ``encoder_layers`` (HCFormer+, Sec. 2.5), ``dcnv2`` (Sec. 2.5, App. E.2).

This module imports nothing else of the package but ``hcformer.errors`` and
``hcformer.families`` (the registered backbone names and head types, checked when a config is
built, so an entry registered later counts).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from hcformer.errors import ConfigError
from hcformer.families import BACKBONES, HEADS


class OneOf:
    """``Annotated`` marker: the value must be a key of ``registry`` (read when a config is
    built, so entries added after import count)."""

    def __init__(self, registry: dict[str, Any]) -> None:
        self.registry = registry


BackboneName = Annotated[str, OneOf(BACKBONES)]
HeadType = Annotated[str, OneOf(HEADS)]
DatasetName = Literal["coco_panoptic", "coco_instance", "ade20k", "cityscapes"]
Task = Literal["panoptic", "instance", "semantic"]


@dataclass
class BackboneConfig:
    """A ResNet (torchvision-style bottlenecks) or Swin backbone with clustering modules.

    ``name`` fixes the family and its paper size; the optional shape keys shrink it for the
    ``tiny``/``smoke`` scales without changing the code path.
    """

    name: BackboneName = "resnet50"
    hierarchy_level: int = 3  # clustering modules at the last L downsamplings (0-3), Sec. 4.1
    dcnv2: bool = True  # ResNet: DCNv2 at the downsamplings that carry a module (Swin: unused)
    cluster_dim: int = 128  # C_F of eq. (3)
    scale_init: float = 0.1  # s(i) of eq. (3)
    pretrained: str = ""  # "" (random init), a local file, or "timm:<name>" (hub cache)
    output_stride: int = 32  # or 8: dilated ResNet of App. E.1 (needs hierarchy_level 0)
    drop_path: float = 0.0  # stochastic depth (0.3 for Swin in the paper)
    # Shape overrides (None = the paper's size for ``name``).
    depths: list[int] | None = None  # blocks per stage
    widths: list[int] | None = None  # ResNet: bottleneck widths per stage (64, 128, 256, 512)
    stem_width: int | None = None  # ResNet: stem channels (64)
    embed_dim: int | None = None  # Swin: channels of stage 0 (96 Swin-S, 192 Swin-L)
    num_heads: list[int] | None = None  # Swin: heads per stage
    window_size: int | None = None  # Swin: 7 (Swin-S) / 12 (Swin-L)


@dataclass
class HeadConfig:
    """The segmentation head on the stride-32 features (Sec. 2.5, 4.1, App. E)."""

    type: HeadType = "hcformer"
    decoder: Literal["masked", "standard"] = (
        "masked"  # masked attention, or the DETR/MaskFormer decoder
    )
    queries: int = 100
    decoder_layers: int = 8  # masked: +1 prediction from the queries; standard: 9 (Table III)
    encoder_layers: int = 0  # 6 = HCFormer+ (a DETR encoder on the stride-32 map)
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    mask_dim: int = 256
    encoder_dropout: float = 0.1
    decoder_dropout: float = 0.0
    pixel_decoder_dim: int = 256  # MaskFormer's FPN / the per-pixel FPN, PSP and ASPP widths


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    num_classes: int = 133


@dataclass
class SynthConfig:
    """Synthetic data written in the dataset's real format (``hcformer synth-data``)."""

    train_images: int = 400
    val_images: int = 50
    size: list[int] = field(default_factory=lambda: [128, 128])  # H, W
    seed: int = 0


@dataclass
class DataConfig:
    """A dataset in its standard on-disk layout and the paper's augmentations (App. D)."""

    dataset: DatasetName = "coco_panoptic"
    task: Task = "panoptic"
    root: str = "datasets/coco"  # relative paths are resolved against the working directory
    synthetic: SynthConfig | None = None  # set: generate the data at ``root`` when absent
    train_split: str = "train2017"
    val_split: str = "val2017"
    # Training augmentation.
    augmentation: Literal["lsj", "scale_crop"] = (
        "lsj"  # COCO large-scale jitter / ADE20K+Cityscapes
    )
    lsj_size: int = 1024
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    crop: list[int] = field(default_factory=lambda: [1024, 1024])  # H, W
    # scale_crop: short side drawn from int(x * 0.1 * scale_base), x in scale_range * 10
    # (None: the crop's short side: ADE20K 512, or 640 for its Swin-L rows; Cityscapes sets
    # 1024), long side capped at train_max_size (None: 4 * scale_base: ADE20K 2048 / 2560,
    # Cityscapes 4096; the authors' MIN_SIZE_TRAIN and MAX_SIZE_TRAIN).
    scale_base: int | None = None
    train_max_size: int | None = None
    color_jitter: bool = False
    # Image value of a training crop's padding to the crop size, before the model normalises
    # (labels: ignore / no mask): 128 as the authors' ADE20K mapper and LSJ's FixedSizeCrop;
    # "mean": the model's pixel mean, i.e. 0 after normalisation (Cityscapes, whose mapper does
    # not pad: the authors' model pads the normalised batch with 0). Test batches are always
    # padded with the mean.
    train_image_pad: float | Literal["mean"] = 128.0
    # Test-time resize (short side, long side at most); inputs are padded to a multiple of 32.
    test_short: int = 800
    test_max: int = 1333
    max_val_images: int | None = None
    num_workers: int = 4


@dataclass
class SolverConfig:
    """AdamW with the backbone at 0.1x, poly or multi-step decay with warm-up (App. D)."""

    iterations: int = 368750
    batch_size: int = 16  # global batch; kept on fewer GPUs by gradient accumulation
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_multiplier: float = 0.1
    schedule: Literal["poly", "step"] = "step"
    poly_power: float = 0.9
    # Decay points: fractions of ``iterations`` (values at most 1) or iteration numbers (above
    # 1; a table row's schedule multiplier scales them with ``iterations``).
    steps: list[float] = field(default_factory=lambda: [0.889, 0.963])
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    clip_grad: float = 0.01  # full-model gradient-norm clipping
    amp: bool = True  # on GPU only
    checkpoint_every: int = 5000
    log_every: int = 20
    # Score the weights on the validation split every N iterations (train_log.jsonl, MLflow
    # histories; the authors' TEST.EVAL_PERIOD); 0: only the final evaluation.
    eval_every: int = 0
    micro_batch: int = 0  # images per forward pass of a process (0: its whole share); accumulation
    find_unused_parameters: bool = False  # DDP: set for models with parameters a step may not use


@dataclass
class LossConfig:
    """Hungarian matching and the loss of Sec. 4.1 (weights of Mask2Former)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0  # BCE
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    reg_weight: float = 0.1  # lambda_reg * sum_i |s(i)|
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class TestConfig:
    """Post-processing as MaskFormer (App. A) with the paper's thresholds."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_topk: int = 100
    boundary_ap: bool = False
    batch_size: int = 1  # validation images per forward pass (padding is per batch)
    visual_images: int = 4  # first val images saved as visual/<stem>.npz (Fig. 5 view)


@dataclass
class TrackingConfig:
    uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else sqlite:///results/<scale>/mlflow.db
    # Log to MLflow while training (live). Only to a tracking server or a store on a local disk:
    # a SQLite/file store on a network file system is refused (hcformer sync-mlflow fills
    # MLflow from the run folders instead).
    enabled: bool = True


@dataclass
class Config:
    """The whole, resolved configuration of one experiment (the run folder's ``config.yaml``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Launcher hints per run (experiments/base/*.yaml, scale overlays): gpus (total, 0 = CPU),
    # cpus, mem_gb, time_min (per SLURM job; a requeued run resumes from its checkpoint).
    resources: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _one_of(value: Any, allowed: tuple[Any, ...], key: str) -> Any:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        also = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{also}")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        return _one_of(value, typing.get_args(tp), key)
    if origin is Annotated:
        base, *markers = typing.get_args(tp)
        value = _coerce(value, base, key)
        for marker in markers:
            if isinstance(marker, OneOf):
                _one_of(value, tuple(marker.registry), key)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 2e-3 (no dot) as a string; a number is what was meant.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys name the valid ones."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            also = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {full!r}{also} valid keys of {where}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config (what ``config.yaml`` holds)."""
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params, override keys)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``; dotted keys address nested values."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = merge(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.head.queries=50", "data.root=/x"]`` -> dotted dict; values are YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. model.head.queries=50")
        key, _, raw = pair.partition("=")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; a clear error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def build_config(data: dict[str, Any]) -> Config:
    """Validate a plain dict (dotted keys allowed) into a :class:`Config`."""
    return from_dict(Config, merge({}, data))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A config of one's own: a YAML file plus ``key=value`` overrides."""
    data = merge(load_yaml(path), parse_overrides(overrides or []))
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
