"""Cityscapes fine annotations (``leftImg8bit`` + ``gtFine``) with the official label table.

Layout under ``root`` (``datasets/cityscapes``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids map to the 19 train ids of ``cityscapesScripts/helpers/labels.py``; every other id
(unlabeled, ego vehicle, parking, guard rail, caravan, ...) becomes 255 (ignored). The prediction
of an image is named by its stem ``<city>_<seq>_<frame>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hcformer.data.base import IGNORE_LABEL, ImageEntry, LabelMapDataset, require_dir
from hcformer.errors import DataError

# (name, label id, train id, has instances, colour): the official table (labels.py).
LABELS: tuple[tuple[str, int, int, bool, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, False, (0, 0, 0)),
    ("ego vehicle", 1, 255, False, (0, 0, 0)),
    ("rectification border", 2, 255, False, (0, 0, 0)),
    ("out of roi", 3, 255, False, (0, 0, 0)),
    ("static", 4, 255, False, (0, 0, 0)),
    ("dynamic", 5, 255, False, (111, 74, 0)),
    ("ground", 6, 255, False, (81, 0, 81)),
    ("road", 7, 0, False, (128, 64, 128)),
    ("sidewalk", 8, 1, False, (244, 35, 232)),
    ("parking", 9, 255, False, (250, 170, 160)),
    ("rail track", 10, 255, False, (230, 150, 140)),
    ("building", 11, 2, False, (70, 70, 70)),
    ("wall", 12, 3, False, (102, 102, 156)),
    ("fence", 13, 4, False, (190, 153, 153)),
    ("guard rail", 14, 255, False, (180, 165, 180)),
    ("bridge", 15, 255, False, (150, 100, 100)),
    ("tunnel", 16, 255, False, (150, 120, 90)),
    ("pole", 17, 5, False, (153, 153, 153)),
    ("polegroup", 18, 255, False, (153, 153, 153)),
    ("traffic light", 19, 6, False, (250, 170, 30)),
    ("traffic sign", 20, 7, False, (220, 220, 0)),
    ("vegetation", 21, 8, False, (107, 142, 35)),
    ("terrain", 22, 9, False, (152, 251, 152)),
    ("sky", 23, 10, False, (70, 130, 180)),
    ("person", 24, 11, True, (220, 20, 60)),
    ("rider", 25, 12, True, (255, 0, 0)),
    ("car", 26, 13, True, (0, 0, 142)),
    ("truck", 27, 14, True, (0, 0, 70)),
    ("bus", 28, 15, True, (0, 60, 100)),
    ("caravan", 29, 255, True, (0, 0, 90)),
    ("trailer", 30, 255, True, (0, 0, 110)),
    ("train", 31, 16, True, (0, 80, 100)),
    ("motorcycle", 32, 17, True, (0, 0, 230)),
    ("bicycle", 33, 18, True, (119, 11, 32)),
)
NUM_CLASSES = 19


def categories() -> list[dict[str, Any]]:
    """The 19 evaluated classes in train-id order."""
    cats = [
        {"id": label_id, "name": name, "isthing": inst, "train_id": train_id, "color": list(color)}
        for name, label_id, train_id, inst, color in LABELS
        if train_id != IGNORE_LABEL
    ]
    return sorted(cats, key=lambda c: c["train_id"])


def _lut() -> np.ndarray:
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for _, label_id, train_id, _, _ in LABELS:
        lut[label_id] = train_id
    return lut


LABEL_TO_TRAIN = _lut()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return LABEL_TO_TRAIN[label_ids.astype(np.uint8)]


class CityscapesDataset(LabelMapDataset):
    name = "cityscapes"

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        image_dir = require_dir(
            root / "leftImg8bit" / split, f"Cityscapes images of split {split!r}"
        )
        gt_dir = require_dir(
            root / "gtFine" / split, f"Cityscapes gtFine labels of split {split!r}"
        )
        entries = []
        for path in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = path.name[: -len("_leftImg8bit.png")]
            city = path.parent.name
            entries.append(
                ImageEntry(
                    image_id=stem,
                    file_name=f"{city}/{path.name}",
                    stem=stem,
                    image_path=path,
                    label_path=gt_dir / city / f"{stem}_gtFine_labelIds.png",
                )
            )
        if not entries:
            raise DataError(f"{image_dir}: no <city>/*_leftImg8bit.png images in split {split!r}")
        super().__init__(
            root=root, split=split, entries=entries, categories=categories(), image_dir=image_dir
        )
        self.gt_dir = gt_dir

    def train_ids(self, label: np.ndarray, path: Path) -> np.ndarray:
        return label_ids_to_train_ids(label)
