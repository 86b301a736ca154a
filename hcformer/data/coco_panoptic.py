"""COCO panoptic segmentation (Kirillov et al. 2019) in the layout of the official release.

Layout under ``root`` (``datasets/coco``)::

    {train,val}2017/*.jpg                                    the images
    annotations/panoptic_{train,val}2017.json                images, annotations, categories
    annotations/panoptic_{train,val}2017/*.png               one RGB PNG per image
    annotations/instances_{train,val}2017.json               (for ``ap_th_pan``)

(detectron2 keeps the PNG folder at ``root/panoptic_{split}/``: both places are accepted.)
A PNG pixel's segment id is R + 256 G + 256^2 B; 0 is VOID. Each annotation's
``segments_info`` lists ``id, category_id, iscrowd, area`` per segment; ``isthing`` comes from
the category. Train ids are contiguous over the categories sorted by id (detectron2's order).

The *semantic view* of the panoptic ground truth (``miou_pan``), :func:`panoptic_to_semantic`,
follows Mask2Former's ``prepare_coco_semantic_annos_from_panoptic_annos.py``: every segment
becomes its category's train id (crowd segments included, as that script does), VOID becomes 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data.base import (
    IGNORE_LABEL,
    Dataset,
    ImageEntry,
    check_size,
    field_of,
    read_json,
    read_panoptic_png,
    require_dir,
)
from hcformer.errors import DataError


def parse_categories(raw: Any, where: str) -> list[dict[str, Any]]:
    """COCO categories (``id, name, isthing``[, ``color``]) in train-id order."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'categories' should be a non-empty list")
    cats = []
    for i, c in enumerate(raw):
        at = f"{where}: categories[{i}]"
        cats.append(
            {
                "id": field_of(c, "id", at, int),
                "name": field_of(c, "name", at, str),
                "isthing": bool(c.get("isthing", 1)),
                "color": list(c.get("color", [0, 0, 0])),
            }
        )
    cats.sort(key=lambda c: c["id"])
    for train_id, c in enumerate(cats):
        c["train_id"] = train_id
    return cats


def image_fields(img: Any, at: str, image_dir: Path) -> dict[str, Any]:
    """The :class:`ImageEntry` fields of a COCO ``images`` record ``img`` (``at`` names it in
    errors): ``image_id``, ``file_name``, its ``stem`` and ``image_path`` in ``image_dir``."""
    image_id = field_of(img, "id", at, (int, str))
    file_name = field_of(img, "file_name", at, str)
    return {
        "image_id": image_id,
        "file_name": file_name,
        "stem": Path(file_name).stem,
        "image_path": image_dir / file_name,
    }


def panoptic_paths(root: Path, split: str) -> tuple[Path, Path]:
    """The panoptic JSON and PNG folder of ``split`` under ``root``."""
    root = Path(root)
    gt_json = root / "annotations" / f"panoptic_{split}.json"
    gt_dir = root / "annotations" / f"panoptic_{split}"
    if not gt_dir.is_dir() and (root / f"panoptic_{split}").is_dir():
        gt_dir = root / f"panoptic_{split}"
    return gt_json, gt_dir


def parse_segments(
    segments_info: Any, cat_by_id: dict[int, dict[str, Any]], where: str
) -> list[dict[str, Any]]:
    """``segments_info`` with each category's train id and ``isthing`` added."""
    if not isinstance(segments_info, list):
        raise DataError(f"{where}: field 'segments_info' should be a list")
    out = []
    for j, s in enumerate(segments_info):
        at = f"{where}: segments_info[{j}]"
        cat_id = field_of(s, "category_id", at, int)
        if cat_id not in cat_by_id:
            raise DataError(f"{at}: category_id {cat_id} is not among the categories")
        cat = cat_by_id[cat_id]
        out.append(
            {
                "id": field_of(s, "id", at, int),
                "category_id": cat_id,
                "label": cat["train_id"],
                "isthing": cat["isthing"],
                "iscrowd": bool(s.get("iscrowd", 0)),
                "area": int(s.get("area", 0)),
            }
        )
    return out


def panoptic_to_semantic(pan_seg: np.ndarray, segments: list[dict[str, Any]]) -> np.ndarray:
    """Train-id label map of a panoptic id map (uint8, 255 = VOID), as Mask2Former's script."""
    out = np.full(pan_seg.shape, IGNORE_LABEL, dtype=np.uint8)
    if not segments:
        return out
    ids = np.array([s["id"] for s in segments])
    labels = np.array([s["label"] for s in segments], dtype=np.uint8)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], pan_seg)
    pos = np.clip(pos, 0, len(ids) - 1)
    hit = ids[order][pos] == pan_seg
    out[hit] = labels[order][pos[hit]]
    return out


class COCOPanopticDataset(Dataset):
    name = "coco_panoptic"
    task = "panoptic"

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        gt_json, gt_dir = panoptic_paths(root, split)
        data = read_json(gt_json, "COCO panoptic annotations")
        where = str(gt_json)
        cats = parse_categories(data.get("categories") if isinstance(data, dict) else None, where)
        self.cat_by_id = {c["id"]: c for c in cats}
        images = field_of(data, "images", where, list)
        annotations = field_of(data, "annotations", where, list)
        image_dir = require_dir(root / split, f"COCO images of split {split!r}")
        require_dir(gt_dir, f"panoptic PNGs of split {split!r}")
        by_image = {}
        for j, ann in enumerate(annotations):
            by_image[field_of(ann, "image_id", f"{where}: annotations[{j}]", (int, str))] = ann
        entries = []
        for j, img in enumerate(images):
            fields = image_fields(img, f"{where}: images[{j}]", image_dir)
            image_id = fields["image_id"]
            if image_id not in by_image:
                raise DataError(f"{where}: image {image_id} has no entry in 'annotations'")
            ann = by_image[image_id]
            png = field_of(ann, "file_name", f"{where}: annotation of image {image_id}", str)
            entries.append(
                ImageEntry(
                    **fields,
                    label_path=gt_dir / png,
                    height=img.get("height"),
                    width=img.get("width"),
                    extra={"segments_info": ann.get("segments_info")},
                )
            )
        super().__init__(
            root=root, split=split, entries=entries, categories=cats, image_dir=image_dir
        )
        self.gt_json = gt_json
        self.gt_dir = gt_dir
        inst = root / "annotations" / f"instances_{split}.json"
        self.instances_json = inst if inst.is_file() else None

    def segments(self, entry: ImageEntry) -> list[dict[str, Any]]:
        where = f"{self.gt_json}: annotation of image {entry.image_id}"
        return parse_segments(entry.extra["segments_info"], self.cat_by_id, where)

    def load_target(self, entry: ImageEntry, size: tuple[int, int]) -> dict[str, Any]:
        pan_seg = read_panoptic_png(entry.label_path)
        check_size(entry.label_path, pan_seg.shape, size, "the panoptic PNG")
        return {"pan_seg": pan_seg, "segments": self.segments(entry)}

    def load_sem_seg(self, i: int) -> np.ndarray:
        entry = self.entries[i]
        return panoptic_to_semantic(read_panoptic_png(entry.label_path), self.segments(entry))
