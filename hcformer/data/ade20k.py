"""ADE20K scene parsing (SceneParsing / ADEChallengeData2016) in its release layout.

Layout under ``root`` (the folder that holds ``ADEChallengeData2016``, or that folder itself)::

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png

A label PNG holds 0 (``other``, ignored) and 1..150; as detectron2 (``reduce_zero_label``)
label k becomes train id k-1 and 0 becomes 255. The 150 classes are those of
``objectInfo150.csv`` of the benchmark (packaged as ``ade20k_categories.json``); a dataset
folder that carries its own ``objectInfo150.csv`` (the synthetic writer does, with fewer
classes) is read with those classes instead.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data.base import IGNORE_LABEL, ImageEntry, LabelMapDataset, require_dir
from hcformer.errors import DataError

SPLITS = {"train": "training", "val": "validation"}


def ade_root(root: Path) -> Path:
    root = Path(root)
    return root if root.name == "ADEChallengeData2016" else root / "ADEChallengeData2016"


def palette(n: int) -> list[list[int]]:
    """A fixed colour per class (for drawings only)."""
    rng = np.random.default_rng(150)
    return rng.integers(0, 256, size=(n, 3)).tolist()


def builtin_categories() -> list[dict[str, Any]]:
    data = json.loads((Path(__file__).with_name("ade20k_categories.json")).read_text())
    return _with_train_ids(data["categories"])


def read_object_info(path: Path) -> list[dict[str, Any]]:
    """Classes from an ``objectInfo150.csv`` (columns Idx, Name, and Stuff when present)."""
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the class list ({exc})") from None
    cats = []
    for n, row in enumerate(rows, start=2):
        try:
            idx = int(row["Idx"])
            name = row["Name"]
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{path}: line {n}: expected columns Idx (an integer) and Name"
            ) from None
        cats.append(
            {"id": idx, "name": name.replace(";", ", "), "isthing": row.get("Stuff") == "0"}
        )
    if [c["id"] for c in cats] != list(range(1, len(cats) + 1)):
        raise DataError(f"{path}: field 'Idx' must count 1, 2, ..., K")
    return _with_train_ids(cats)


def _with_train_ids(cats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    colors = palette(len(cats))
    return [
        {"id": c["id"], "name": c["name"], "isthing": bool(c["isthing"]), "train_id": c["id"] - 1}
        | {"color": colors[i]}
        for i, c in enumerate(cats)
    ]


def categories(root: Path) -> list[dict[str, Any]]:
    info = ade_root(root) / "objectInfo150.csv"
    return read_object_info(info) if info.is_file() else builtin_categories()


def label_to_train_ids(label: np.ndarray, num_classes: int, path: Path | str = "") -> np.ndarray:
    """ADE20K label values (0 = other, 1..K) -> train ids (0..K-1, 255 = ignore)."""
    if label.size and int(label.max()) > num_classes:
        raise DataError(f"{path}: label value {int(label.max())} exceeds the {num_classes} classes")
    out = label.astype(np.int32) - 1
    out[label == 0] = IGNORE_LABEL
    return out.astype(np.uint8)


class ADE20KDataset(LabelMapDataset):
    name = "ade20k"

    def __init__(self, root: Path, split: str) -> None:
        base = ade_root(root)
        image_dir = require_dir(base / "images" / split, f"ADE20K images of split {split!r}")
        label_dir = require_dir(base / "annotations" / split, f"ADE20K labels of split {split!r}")
        entries = []
        for path in sorted(image_dir.glob("*.jpg")):
            entries.append(
                ImageEntry(
                    image_id=path.stem,
                    file_name=path.name,
                    stem=path.stem,
                    image_path=path,
                    label_path=label_dir / f"{path.stem}.png",
                )
            )
        if not entries:
            raise DataError(f"{image_dir}: no .jpg images in ADE20K split {split!r}")
        super().__init__(
            root=Path(root),
            split=split,
            entries=entries,
            categories=categories(root),
            image_dir=image_dir,
        )
        self.gt_dir = label_dir

    def train_ids(self, label: np.ndarray, path: Path) -> np.ndarray:
        return label_to_train_ids(label, self.num_classes, path)
