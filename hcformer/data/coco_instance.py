"""COCO instance segmentation (``instances_{split}.json``) in the official layout.

Layout under ``root`` (``datasets/coco``)::

    {train,val}2017/*.jpg
    annotations/instances_{train,val}2017.json

Masks come from polygons, compressed or uncompressed RLE through pycocotools. ``iscrowd``
annotations are kept in the record (flag ``iscrowd``) and left out of the training targets;
the evaluator treats them as COCO does. Train ids are contiguous over the categories sorted by
id (80 for COCO). The training split leaves out images without a usable non-crowd annotation
(:meth:`COCOInstanceDataset.drop_images_without_instances`, about 1% of train2017), as the
authors' training does (detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data.base import (
    Dataset,
    ImageEntry,
    PackedList,
    field_of,
    read_json,
    require_dir,
)
from hcformer.data.coco_panoptic import image_fields, parse_categories
from hcformer.errors import DataError


def ann_to_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray | None:
    """A COCO ``segmentation`` (polygons or RLE) as a bool mask ``[height, width]``.

    Polygons with fewer than 3 points are dropped, and an annotation left with none gives
    ``None`` (skipped, as detectron2's ``load_coco_json`` does).
    """
    from pycocotools import mask as mask_util  # here: only COCO needs it (GPU images lack it)

    try:
        if isinstance(segmentation, list):  # polygons
            polys = valid_polygons(segmentation)
            if not polys:
                return None
            rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_util.frPyObjects(segmentation, height, width)  # uncompressed RLE
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise ValueError("expected polygons or an RLE dict with 'counts' and 'size'")
        mask = mask_util.decode(rle)
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{where}: malformed field 'segmentation' ({exc})") from None
    if mask.shape[:2] != (height, width):
        raise DataError(
            f"{where}: 'segmentation' is {mask.shape[0]}x{mask.shape[1]}, the image {height}x{width}"
        )
    return mask.astype(bool)


def valid_polygons(segmentation: list) -> list[list]:
    """The polygons of a polygon ``segmentation`` that have at least 3 points."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def is_usable_instance(ann: dict[str, Any]) -> bool:
    """A non-crowd annotation that detectron2's ``load_coco_json`` keeps (it skips polygon
    annotations without a polygon of 3 points; RLE masks are kept)."""
    seg = ann.get("segmentation")
    if ann.get("iscrowd", 0) != 0:
        return False
    return not (isinstance(seg, list) and seg and not valid_polygons(seg))


class COCOInstanceDataset(Dataset):
    name = "coco_instance"
    task = "instance"

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        gt_json = root / "annotations" / f"instances_{split}.json"
        data = read_json(gt_json, "COCO instances annotations")
        where = str(gt_json)
        cats = parse_categories(data.get("categories") if isinstance(data, dict) else None, where)
        for c in cats:
            c["isthing"] = True
        self.cat_by_id = {c["id"]: c for c in cats}
        images = field_of(data, "images", where, list)
        annotations = field_of(data, "annotations", where, list)
        image_dir = require_dir(root / split, f"COCO images of split {split!r}")
        anns: dict[Any, list] = {}
        for j, ann in enumerate(annotations):
            at = f"{where}: annotations[{j}]"
            anns.setdefault(field_of(ann, "image_id", at, (int, str)), []).append((j, ann))
        entries = []
        for j, img in enumerate(images):
            at = f"{where}: images[{j}]"
            fields = image_fields(img, at, image_dir)
            entries.append(
                ImageEntry(
                    **fields,
                    height=field_of(img, "height", at, int),
                    width=field_of(img, "width", at, int),
                    extra={"annotations": anns.get(fields["image_id"], [])},
                )
            )
        super().__init__(
            root=root, split=split, entries=entries, categories=cats, image_dir=image_dir
        )
        self.gt_json = gt_json

    def drop_images_without_instances(self) -> int:
        """Leave out the images with no usable non-crowd annotation (none, or crowds only), as
        detectron2 does to a training set when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is on (the
        authors' COCO configs); returns how many were left out."""
        keep = [
            e for e in self.entries if any(is_usable_instance(a) for _, a in e.extra["annotations"])
        ]
        dropped = len(self.entries) - len(keep)
        if dropped:
            self.entries = PackedList(keep)
        return dropped

    def load_target(self, entry: ImageEntry, size: tuple[int, int]) -> dict[str, Any]:
        if (entry.height, entry.width) != tuple(size):
            raise DataError(
                f"{self.gt_json}: image {entry.image_id} is {entry.height}x{entry.width} in the JSON, "
                f"{size[0]}x{size[1]} in {entry.image_path}"
            )
        masks, labels, crowd = [], [], []
        for j, ann in entry.extra["annotations"]:
            at = f"{self.gt_json}: annotations[{j}]"
            cat_id = field_of(ann, "category_id", at, int)
            if cat_id not in self.cat_by_id:
                raise DataError(f"{at}: category_id {cat_id} is not among the categories")
            mask = ann_to_mask(field_of(ann, "segmentation", at), *size, at)
            if mask is None:
                continue
            masks.append(mask)
            labels.append(self.cat_by_id[cat_id]["train_id"])
            crowd.append(bool(ann.get("iscrowd", 0)))
        return {
            "masks": np.stack(masks) if masks else np.zeros((0, *size), dtype=bool),
            "labels": np.array(labels, dtype=np.int64),
            "iscrowd": np.array(crowd, dtype=bool),
        }
