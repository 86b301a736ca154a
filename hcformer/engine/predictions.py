"""Prediction files in the formats the evaluators read (docs/interfaces.md, "Evaluation").

- semantic: one PNG of train ids per image, ``<dir>/<stem>.png`` (uint8; 255 = no class);
- panoptic: COCO panoptic format: ``<dir>/<stem>.png`` (RGB, id = R + 256 G + 256^2 B) and one
  JSON ``{"annotations": [{"image_id", "file_name", "segments_info": [{"id", "category_id",
  "isthing", "score", "area"}]}], "categories": [...]}``;
- instance: a COCO results JSON, ``[{"image_id", "category_id", "segmentation": RLE, "score"}]``
  with the RLE of pycocotools (``counts`` as text).
Category ids are the dataset's own (``ds.categories[train_id]["id"]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_label_png(labels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


class SemanticWriter:
    """``<stem>.png`` of train ids in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, stem: str, labels: np.ndarray) -> None:
        write_label_png(labels, self.folder / f"{stem}.png")


class PanopticWriter:
    """COCO panoptic PNGs in ``folder`` and their JSON at ``json_path``."""

    def __init__(self, folder: Path, json_path: Path, categories: list[dict[str, Any]]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.json_path = Path(json_path)
        self.categories = categories
        self.annotations: list[dict[str, Any]] = []

    def add(self, image_id: Any, stem: str, segment_map: np.ndarray, segments: list[dict]) -> None:
        from hcformer.data.base import id2rgb

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
    from pycocotools import mask as mask_utils

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
