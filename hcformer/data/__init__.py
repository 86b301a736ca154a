"""Datasets in their real on-disk formats, the paper's transforms, and synthetic data.

Entry points (docs/interfaces.md):

- ``build_dataset(cfg: DataConfig, split: "train" | "val") -> Dataset``: the reader for
  ``cfg.dataset`` over ``cfg.root`` (``cfg.train_split`` / ``cfg.val_split``; the val split is cut
  to ``cfg.max_val_images`` when set; the coco_instance train split leaves out images without a
  non-crowd instance, as detectron2's ``FILTER_EMPTY_ANNOTATIONS``). When ``cfg.synthetic`` is
  set and the folder is absent, the synthetic data is written first
  (:func:`hcformer.data.synthetic.write_synthetic`).
  ``len(ds)``; ``ds.load(i) -> Record`` (``image`` uint8 [H, W, 3], ``target``, ``image_id``,
  ``file_name``, ``stem``); ``ds.load_sem_seg(i)`` (train-id map, 255 = ignore; for COCO
  panoptic the *semantic view* used for ``miou_pan``). Metadata:
  ``ds.categories`` (dicts ``id, name, isthing, train_id, color`` in train-id order),
  ``ds.num_classes``, ``ds.image_ids``, ``ds.stems``, and the ground truth the evaluators take:

  ==============  ============================  =====================================  ==================
  dataset         ``ds.gt_json``                ``ds.gt_dir``                          also
  ==============  ============================  =====================================  ==================
  coco_panoptic   panoptic_{split}.json         the panoptic PNG folder                ``instances_json``
  coco_instance   instances_{split}.json        None
  ade20k          None                          annotations/<split> (label PNGs)
  cityscapes      None                          gtFine/<split> (city folders)
  ==============  ============================  =====================================  ==================

- ``train_transform(record, cfg, rng) -> Sample`` and ``test_transform(record, cfg) -> Sample``
  (:mod:`hcformer.data.transforms`): ``image`` uint8 [3, H, W]; ``instances`` (``labels`` int64
  [N], ``masks`` bool [N, H, W]: panoptic = non-crowd segments, instance = non-crowd things,
  semantic = one per class present); ``sem_seg`` int64 [H, W] (semantic datasets); ``meta``
  (``image_id, file_name, stem, orig_size, size``: ``size`` is the resized image before padding).
- ``collate(samples, size_divisibility=32, *, pad_value) -> {"images", "targets", "metas"}``
  (images float32, padded with ``pad_value``: see :mod:`hcformer.engine.batches`).
- ``panoptic_to_semantic(pan_seg, segments)``: the semantic view of a panoptic id map.
- ``write_synthetic(dataset, out, images, size, seed, val_images)`` and ``hcformer synth-data``.

The readers import no torch; the names of ``_LAZY`` below load on first use, so that importing a
reader (``hcformer synth-data``, ``hcformer evaluate-semantic``) does not pay for torch
(``transforms``) or need pycocotools (``synthetic``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hcformer.data.ade20k import ADE20KDataset
from hcformer.data.cityscapes import CityscapesDataset
from hcformer.data.coco_instance import COCOInstanceDataset
from hcformer.data.coco_panoptic import COCOPanopticDataset
from hcformer.errors import ConfigError

if TYPE_CHECKING:
    from hcformer.config import DataConfig
    from hcformer.data.base import Dataset

_LAZY = {
    "Record": "hcformer.data.base",
    "Dataset": "hcformer.data.base",
    "IGNORE_LABEL": "hcformer.data.base",
    "train_transform": "hcformer.data.transforms",
    "test_transform": "hcformer.data.transforms",
    "collate": "hcformer.data.transforms",
    "panoptic_to_semantic": "hcformer.data.coco_panoptic",
    "write_synthetic": "hcformer.data.synthetic",
    "ensure_synthetic": "hcformer.data.synthetic",
}

__all__ = ["build_dataset", "dataset_class", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hcformer.data' has no attribute {name!r}")


def dataset_class(name: str) -> type:
    classes = {
        "coco_panoptic": COCOPanopticDataset,
        "coco_instance": COCOInstanceDataset,
        "ade20k": ADE20KDataset,
        "cityscapes": CityscapesDataset,
    }
    if name not in classes:
        raise ConfigError(f"data.dataset: {name!r} is not one of {sorted(classes)}")
    return classes[name]


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The reader of ``cfg.dataset`` for ``split`` ("train" or "val"); see the module docstring."""
    if split not in ("train", "val"):
        raise ConfigError(f"split {split!r}: expected 'train' or 'val'")
    if cfg.synthetic is not None:
        # Here: the synthetic writer needs pycocotools, which a machine that only trains on
        # real data (a GPU node) need not have.
        from hcformer.data.synthetic import ensure_synthetic

        ensure_synthetic(cfg)
    cls = dataset_class(cfg.dataset)
    if cls.task != cfg.task:
        raise ConfigError(
            f"data.task: {cfg.task!r} does not fit data.dataset {cfg.dataset!r} "
            f"(expected {cls.task!r})"
        )
    ds = cls(Path(cfg.root), cfg.train_split if split == "train" else cfg.val_split)
    if split == "train" and cfg.dataset == "coco_instance":
        ds.drop_images_without_instances()  # as detectron2's FILTER_EMPTY_ANNOTATIONS
    if split == "val" and cfg.max_val_images:
        ds.subset(cfg.max_val_images)
    return ds
