"""The files an evaluation writes: predictions in the official formats and the Fig. 5 view.

Predictions (read back by the evaluators of this package; docs/interfaces.md, "Evaluation"):

- semantic: one PNG of train ids per image, ``<dir>/<stem>.png`` (uint8; 255 = no class);
- panoptic: COCO panoptic format: ``<dir>/<stem>.png`` (RGB, id = R + 256 G + 256^2 B) and one
  JSON ``{"annotations": [{"image_id", "file_name", "segments_info": [{"id", "category_id",
  "isthing", "score", "area"}]}], "categories": [...]}``;
- instance: a COCO results JSON, ``[{"image_id", "category_id", "segmentation": RLE, "score"}]``
  with the RLE of pycocotools (``counts`` as text).

Category ids are the dataset's own (``ds.categories[train_id]["id"]``).

The Fig. 5 view (:func:`save_visual`): ``visual/<stem>.npz`` with the keys

- ``image``: uint8 ``[H, W, 3]`` RGB at the original size;
- ``clusters``: int32 ``[L, H, W]``, the hard cluster map of each level (row i = level i + 1, so
  the last row is the finest), each value the index of the coarsest cell the pixel belongs to,
  upsampled nearest to the image size (``[0, H, W]`` for a model without clustering modules);
- ``pred``: uint8 ``[H, W]``, the predicted class (train id) of each pixel: semantic argmax, or
  for panoptic the category of the pixel's segment; 255 = no segment;
- ``gt``: uint8 ``[H, W]``, the ground-truth class (train id; panoptic: the semantic view;
  coco_instance: the instance index + 1 with 0 = background), 255 = ignore;
- ``stride``: int32 ``[L]``, the stride of each level's cluster map before upsampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from hcformer.data.base import id2rgb
from hcformer.evaluation.undersegmentation import upsample_nearest


def write_label_png(labels: np.ndarray, path: Path) -> None:
    """A uint8 label map as a one-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


class PanopticWriter:
    """COCO panoptic PNGs in ``folder`` and their JSON at ``json_path``."""

    def __init__(self, folder: Path, json_path: Path, categories: list[dict[str, Any]]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.json_path = Path(json_path)
        self.categories = categories
        self.annotations: list[dict[str, Any]] = []

    def add(self, image_id: Any, stem: str, segment_map: np.ndarray, segments: list[dict]) -> None:
        file_name = f"{stem}.png"
        Image.fromarray(id2rgb(segment_map)).save(self.folder / file_name)
        info = [
            {
                "id": int(s["id"]),
                "category_id": int(self.categories[s["category"]]["id"]),
                "isthing": int(bool(s["isthing"])),
                "score": float(s["score"]),
                "area": int(s["area"]),
            }
            for s in segments
        ]
        self.annotations.append(
            {"image_id": image_id, "file_name": file_name, "segments_info": info}
        )

    def close(self) -> Path:
        cats = [{k: c[k] for k in ("id", "name", "isthing") if k in c} for c in self.categories]
        self.json_path.write_text(json.dumps({"annotations": self.annotations, "categories": cats}))
        return self.json_path


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """pycocotools RLE of a boolean mask, JSON-ready."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class InstanceWriter:
    """A COCO results JSON."""

    def __init__(self, json_path: Path, categories: list[dict[str, Any]]) -> None:
        self.json_path = Path(json_path)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.categories = categories
        self.results: list[dict[str, Any]] = []

    def add(self, image_id: Any, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
        for score, label, mask in zip(scores.tolist(), labels.tolist(), masks):
            self.results.append(
                {
                    "image_id": image_id,
                    "category_id": int(self.categories[int(label)]["id"]),
                    "segmentation": encode_rle(mask),
                    "score": float(score),
                }
            )

    def close(self) -> Path:
        self.json_path.write_text(json.dumps(self.results))
        return self.json_path


def save_visual(
    path: Path,
    image: np.ndarray,
    cluster_maps: list[tuple[np.ndarray, int]],
    pred: np.ndarray | None,
    gt: np.ndarray,
) -> None:
    """One ``visual/<stem>.npz`` (keys in the module docstring), all at the original size.

    ``cluster_maps``: each level's hard cluster map (any size) and its stride, level 1 first.
    """
    height, width = image.shape[:2]
    clusters = np.zeros((len(cluster_maps), height, width), dtype=np.int32)
    strides = np.zeros(len(cluster_maps), dtype=np.int32)
    for k, (labels, stride) in enumerate(cluster_maps):
        clusters[k] = upsample_nearest(labels, (height, width))
        strides[k] = stride
    if pred is None:
        pred = np.full((height, width), 255, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(
        tmp,
        image=image.astype(np.uint8),
        clusters=clusters,
        pred=pred.astype(np.uint8),
        gt=gt.astype(np.uint8),
        stride=strides,
    )
    tmp.replace(path)
