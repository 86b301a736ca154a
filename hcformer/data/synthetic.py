"""Synthetic scenes written in the real on-disk formats (``hcformer synth-data``).

The ``tiny`` and ``smoke`` scales train and evaluate on these through the real readers and
evaluators (docs/tiny-scale.md); the scenes themselves are :mod:`hcformer.data.scenes`
(things with instance ids, crowds, VOID, stuff; colour pairs), each image drawn from its own
generator ``default_rng([seed, split, index])``, so a seed fixes the dataset.

Formats (``--images N`` is the train count, ``--val-images`` defaults to ``max(8, N // 8)``):

- ``coco_panoptic`` / ``coco_instance`` (one layout, both written): ``{train,val}2017/*.jpg``,
  ``annotations/panoptic_{split}.json`` + ``annotations/panoptic_{split}/*.png`` (things ids
  1, 3, 5, 7; stuff ids 92, 95, 100, 118; segment id = category id * 1000 + k), and
  ``annotations/instances_{split}.json`` (things only; RLE masks, uncompressed for crowds).
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``, labels 1..8
  (0 = VOID), and ``ADEChallengeData2016/objectInfo150.csv`` naming the 8 classes.
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_{labelIds,instanceIds}.png`` with the real label ids
  (road, sidewalk, vegetation, sky, car, truck, person, bicycle; VOID = unlabeled), so the
  model has Cityscapes' 19 train ids of which 8 occur.

A finished folder holds ``SYNTHETIC.json`` (the parameters); :func:`write_synthetic` builds in
a temporary folder and renames it into place, so concurrent callers never see a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from hcformer.data.base import id2rgb
from hcformer.data.scenes import CLASSES, Scene, make_scene
from hcformer.errors import DataError

MARKER = "SYNTHETIC.json"
VERSION = 1
FORMATS = {
    "coco_panoptic": "coco",
    "coco_instance": "coco",
    "ade20k": "ade20k",
    "cityscapes": "cityscapes",
}


COCO_IDS = {4: 1, 5: 3, 6: 5, 7: 7, 0: 92, 1: 95, 2: 100, 3: 118}
# Cityscapes label ids: road, sidewalk, vegetation, sky, car, truck, person, bicycle.
CITYSCAPES_IDS = {0: 7, 1: 8, 2: 21, 3: 23, 4: 26, 5: 27, 6: 24, 7: 33}
CITYSCAPES_VOID = 0  # "unlabeled"
# --------------------------------------------------------------------------------------
# Writers, one per format.


def _save_jpg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, quality=95)


def _save_png(arr: np.ndarray, path: Path, mode: str | None = None) -> None:
    Image.fromarray(arr, mode=mode).save(path, compress_level=1)


class _ADE20KWriter:
    splits = {"train": "training", "val": "validation"}

    def __init__(self, out: Path) -> None:
        self.base = out / "ADEChallengeData2016"

    def begin(self, split: str) -> None:
        for kind in ("images", "annotations"):
            (self.base / kind / self.splits[split]).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, i: int, scene: Scene) -> None:
        name = f"ADE_{split}_{i + 1:08d}"
        _save_jpg(scene.image, self.base / "images" / self.splits[split] / f"{name}.jpg")
        label = (scene.classes + 1).astype(np.uint8)  # -1 (VOID) -> 0
        _save_png(label, self.base / "annotations" / self.splits[split] / f"{name}.png")

    def end(self, split: str) -> None:
        lines = ["Idx,Ratio,Train,Val,Stuff,Name"]
        lines += [f"{i + 1},0,0,0,{int(not c.isthing)},{c.name}" for i, c in enumerate(CLASSES)]
        (self.base / "objectInfo150.csv").write_text("\n".join(lines) + "\n")


class _CityscapesWriter:
    cities = {"train": ["aachen", "bochum", "bremen"], "val": ["frankfurt", "lindau"]}

    def __init__(self, out: Path) -> None:
        self.out = out

    def begin(self, split: str) -> None:
        for city in self.cities[split]:
            (self.out / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (self.out / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, i: int, scene: Scene) -> None:
        cities = self.cities[split]
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19 * (i + 1):06d}"
        _save_png(scene.image, self.out / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        lut = np.full(len(CLASSES) + 1, CITYSCAPES_VOID, dtype=np.uint8)
        for c, label_id in CITYSCAPES_IDS.items():
            lut[c + 1] = label_id
        label_ids = lut[scene.classes + 1]
        gt = self.out / "gtFine" / split / city
        _save_png(label_ids, gt / f"{stem}_gtFine_labelIds.png")
        # instanceIds: label id * 1000 + k for thing instances, the label id elsewhere (crowds).
        inst = label_ids.astype(np.int32)
        for k, (c, crowd) in enumerate(scene.things, start=1):
            if not crowd:
                inst[scene.instances == k] = CITYSCAPES_IDS[c] * 1000 + k - 1
        _save_png(inst.astype(np.uint16), gt / f"{stem}_gtFine_instanceIds.png")

    def end(self, split: str) -> None:
        pass


class _COCOWriter:
    names = {"train": "train2017", "val": "val2017"}

    def __init__(self, out: Path) -> None:
        self.out = out
        self.ann_dir = out / "annotations"
        self.records: dict[str, dict[str, list]] = {}

    def begin(self, split: str) -> None:
        name = self.names[split]
        (self.out / name).mkdir(parents=True, exist_ok=True)
        (self.ann_dir / f"panoptic_{name}").mkdir(parents=True, exist_ok=True)
        self.records[split] = {"images": [], "panoptic": [], "instances": []}

    def add(self, split: str, i: int, scene: Scene) -> None:
        name = self.names[split]
        image_id = (1 if split == "train" else 1_000_001) + i
        file_name = f"{image_id:012d}"
        H, W = scene.classes.shape
        _save_jpg(scene.image, self.out / name / f"{file_name}.jpg")
        rec = self.records[split]
        rec["images"].append(
            {"id": image_id, "file_name": f"{file_name}.jpg", "height": H, "width": W}
        )
        pan = np.zeros((H, W), dtype=np.int32)
        segments = []
        count: dict[int, int] = {}

        def add_segment(mask: np.ndarray, c: int, crowd: bool) -> None:
            cat = COCO_IDS[c]
            count[cat] = count.get(cat, 0) + 1
            seg_id = cat * 1000 + count[cat]
            pan[mask] = seg_id
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            segments.append(
                {
                    "id": seg_id,
                    "category_id": cat,
                    "iscrowd": int(crowd),
                    "area": int(mask.sum()),
                    "bbox": bbox,
                }
            )
            if CLASSES[c].isthing:
                fm = np.asfortranarray(mask.astype(np.uint8))
                if crowd:
                    rle = {"counts": _uncompressed_counts(mask), "size": [H, W]}
                else:
                    rle = mask_util.encode(fm)
                    rle["counts"] = rle["counts"].decode("ascii")
                rec["instances"].append(
                    {
                        "id": len(rec["instances"]) + 1 + (0 if split == "train" else 10_000_000),
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": rle,
                        "area": int(mask.sum()),
                        "bbox": [float(v) for v in bbox],
                        "iscrowd": int(crowd),
                    }
                )

        for c in np.unique(scene.classes):
            if c >= 0 and not CLASSES[c].isthing:
                add_segment(scene.classes == c, int(c), False)
        for k, (c, crowd) in enumerate(scene.things, start=1):
            m = scene.instances == k
            if m.any():
                add_segment(m, c, crowd)
        _save_png(id2rgb(pan), self.ann_dir / f"panoptic_{name}" / f"{file_name}.png")
        rec["panoptic"].append(
            {"image_id": image_id, "file_name": f"{file_name}.png", "segments_info": segments}
        )

    def end(self, split: str) -> None:
        name = self.names[split]
        rec = self.records[split]
        info = {
            "description": "hcformer synthetic scenes in the COCO 2017 format",
            "version": str(VERSION),
        }
        cats = []
        for c, cat_id in sorted(COCO_IDS.items(), key=lambda kv: kv[1]):
            cls = CLASSES[c]
            cats.append(
                {
                    "id": cat_id,
                    "name": cls.name,
                    "supercategory": "thing" if cls.isthing else "stuff",
                    "isthing": int(cls.isthing),
                    "color": list(cls.color),
                }
            )
        panoptic = {
            "info": info,
            "licenses": [],
            "images": rec["images"],
            "annotations": rec["panoptic"],
            "categories": cats,
        }
        instances = {
            "info": info,
            "licenses": [],
            "images": rec["images"],
            "annotations": rec["instances"],
            "categories": [
                {k: v for k, v in c.items() if k not in ("isthing", "color")}
                for c in cats
                if c["isthing"]
            ],
        }
        (self.ann_dir / f"panoptic_{name}.json").write_text(json.dumps(panoptic))
        (self.ann_dir / f"instances_{name}.json").write_text(json.dumps(instances))


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


WRITERS: dict[str, Callable[[Path], Any]] = {
    "coco": _COCOWriter,
    "ade20k": _ADE20KWriter,
    "cityscapes": _CityscapesWriter,
}


# --------------------------------------------------------------------------------------
# The API and the command.


def default_val_images(images: int) -> int:
    return max(8, images // 8)


def _generate(
    fmt: str, out: Path, counts: dict[str, int], size: tuple[int, int], seed: int
) -> None:
    writer = WRITERS[fmt](out)
    for split_index, (split, n) in enumerate(counts.items()):
        writer.begin(split)
        for i in range(n):
            rng = np.random.default_rng([seed, split_index, i])
            writer.add(split, i, make_scene(rng, *size))
        writer.end(split)


def write_synthetic(
    dataset: str,
    out: str | Path,
    images: int,
    size: tuple[int, int] | list[int],
    seed: int = 0,
    val_images: int | None = None,
) -> Path:
    """Write (once) a synthetic ``dataset`` under ``out`` in its real layout; return ``out``.

    Safe when several processes ask for the same folder at once: each builds in its own
    temporary folder and renames it into place; the losers discard theirs. A folder that is
    already complete (``SYNTHETIC.json`` with the same parameters) is reused as it is;
    ``coco_panoptic`` and ``coco_instance`` share one layout, so they share a folder.
    """
    if dataset not in FORMATS:
        raise DataError(f"synthetic dataset {dataset!r}: expected one of {sorted(FORMATS)}")
    fmt = FORMATS[dataset]
    out = Path(out)
    h, w = (int(v) for v in size)
    if h < 32 or w < 32 or images < 1:
        raise DataError(
            f"synthetic {dataset}: need images >= 1 and a size of at least 32x32, got {images} and {h}x{w}"
        )
    n_val = default_val_images(images) if val_images is None else int(val_images)
    params = {
        "format": fmt,
        "train_images": int(images),
        "val_images": n_val,
        "size": [h, w],
        "seed": int(seed),
        "version": VERSION,
    }
    if _complete(out, params):
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{out}: exists and holds no complete synthetic dataset ({MARKER} missing); "
            "remove it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(fmt, tmp, {"train": int(images), "val": n_val}, (h, w), int(seed))
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
        try:
            os.rename(tmp, out)  # atomic; fails when another process got there first
        except OSError:
            if not _complete(out, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(out: Path, params: dict[str, Any]) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        have = json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{marker}: not valid JSON; remove {out} to regenerate it") from None
    if have != params:
        diff = {k: (have.get(k), v) for k, v in params.items() if have.get(k) != v}
        raise DataError(
            f"{marker}: {out} holds a synthetic dataset with other parameters "
            f"(have, wanted: {diff}); remove it or choose another folder"
        )
    return True


def ensure_synthetic(cfg: Any) -> Path | None:
    """Generate ``cfg.root`` from ``cfg.synthetic`` (a :class:`DataConfig`) when it is set."""
    if cfg.synthetic is None:
        return None
    s = cfg.synthetic
    return write_synthetic(cfg.dataset, cfg.root, s.train_images, s.size, s.seed, s.val_images)
