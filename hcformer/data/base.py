"""What every dataset reader shares: the :class:`Record`, the :class:`Dataset` base, file helpers.

A reader lists the images of one split of a dataset in its standard on-disk layout and loads
one image with its ground truth, unaugmented, as a :class:`Record`. The target depends on the
task (``docs/interfaces.md``):

- ``"semantic"``: ``{"sem_seg": uint8 [H, W]}``, contiguous train ids, 255 = ignore;
- ``"panoptic"``: ``{"pan_seg": int32 [H, W], "segments": [...]}``: the segment id map of the
  COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 = VOID) and one dict per segment with
  ``id, category_id, label`` (contiguous), ``isthing, iscrowd, area``;
- ``"instance"``: ``{"masks": bool [N, H, W], "labels": int64 [N], "iscrowd": bool [N]}``.

Bad or missing files raise :class:`hcformer.errors.DataError` naming the file and the field.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hcformer.errors import DataError

IGNORE_LABEL = 255


@dataclass
class Record:
    """One unaugmented image and its ground truth (see the module docstring for ``target``)."""

    image: np.ndarray  # uint8 [H, W, 3], RGB
    target: dict[str, Any]
    image_id: int | str
    file_name: str  # the image file, relative to the split's image folder
    stem: str  # names the prediction files of this image (e.g. "ADE_val_00000001")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class ImageEntry:
    """What a reader knows about an image before loading it."""

    image_id: int | str
    file_name: str
    stem: str
    image_path: Path
    label_path: Path | None = None
    height: int | None = None
    width: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PackedList(Sequence):
    """A read-only list of picklable items held as one byte buffer and its offsets.

    The DataLoader workers of a training process are forked from it and read its dataset's
    image list: a list of Python objects is copied page by page into every worker as reference
    counts change (copy-on-write), which grows with the list (COCO: 118k images with their
    segments) times the workers. One numpy buffer is never written, so it stays shared
    (detectron2 serialises its dataset lists for the same reason). Measured: a forked process
    reading every entry of a COCO-sized list (118k images, 11 segments each) dirtied 217 MB of
    it as a list, 3 MB packed. Items are unpickled on access; slicing gives a ``PackedList``.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PackedList(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"PackedList index {i} out of range ({n} items)")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return pickle.loads(self._data[start : int(self._ends[i])].tobytes())


class Dataset:
    """One split of a dataset: ``len(ds)``, ``ds.load(i) -> Record`` and the metadata below.

    Attributes (every reader sets them):
        name: ``coco_panoptic``, ``coco_instance``, ``ade20k`` or ``cityscapes``.
        task: ``panoptic``, ``instance`` or ``semantic``.
        split: the split's folder name (``val2017``, ``validation``, ``val``).
        root: the dataset root.
        categories: one dict per class in train-id order: ``id`` (the dataset's own id),
            ``name``, ``isthing`` (bool), ``train_id`` (contiguous, 0..K-1), ``color``.
        num_classes: ``len(categories)``.
        image_dir: the folder of the split's images.
        gt_json: the panoptic or instances JSON (COCO formats), else ``None``.
        gt_dir: panoptic PNG folder (coco_panoptic), label folder of the split (ADE20K
            ``annotations/validation``, Cityscapes ``gtFine/val``), ``None`` for coco_instance.
        instances_json: coco_panoptic only: the COCO instances JSON of the same images, for
            ``ap_th_pan`` (``None`` when the file is absent).
    """

    name: str = ""
    task: str = ""
    gt_json: Path | None = None
    gt_dir: Path | None = None
    instances_json: Path | None = None

    def __init__(
        self,
        *,
        root: Path,
        split: str,
        entries: Sequence[ImageEntry],
        categories: list[dict[str, Any]],
        image_dir: Path,
    ) -> None:
        self.root = Path(root)
        self.split = split
        # Packed: shared by the DataLoader workers without copy-on-write growth.
        self.entries = PackedList(entries)
        self.categories = categories
        self.image_dir = Path(image_dir)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def image_ids(self) -> list[int | str]:
        return [e.image_id for e in self.entries]

    @property
    def stems(self) -> list[str]:
        return [e.stem for e in self.entries]

    @property
    def thing_train_ids(self) -> list[int]:
        return [c["train_id"] for c in self.categories if c["isthing"]]

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )

    def subset(self, n: int) -> Dataset:
        """The first ``n`` images (``data.max_val_images``); evaluators take ``image_ids``."""
        self.entries = self.entries[:n]
        return self

    def load(self, i: int) -> Record:
        if not 0 <= i < len(self.entries):
            raise IndexError(f"{self!r}: index {i} out of range")
        entry = self.entries[i]
        image = read_image(entry.image_path)
        target = self.load_target(entry, image.shape[:2])
        return Record(
            image=image,
            target=target,
            image_id=entry.image_id,
            file_name=entry.file_name,
            stem=entry.stem,
        )

    def load_target(self, entry: ImageEntry, size: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError

    def load_sem_seg(self, i: int) -> np.ndarray:
        """The semantic label map (train ids, 255 = ignore) of image ``i``."""
        raise NotImplementedError


class LabelMapDataset(Dataset):
    """A semantic dataset whose target is one label PNG per image (``ImageEntry.label_path``),
    in the dataset's own values, mapped to train ids by :meth:`train_ids` (ADE20K, Cityscapes)."""

    task = "semantic"

    def train_ids(self, label: np.ndarray, path: Path) -> np.ndarray:
        """The dataset's label values of the file ``path`` as train ids (255 = ignore)."""
        raise NotImplementedError

    def load_target(self, entry: ImageEntry, size: tuple[int, int]) -> dict[str, Any]:
        label = read_label_png(entry.label_path)
        check_size(entry.label_path, label.shape, size, "the label")
        return {"sem_seg": self.train_ids(label, entry.label_path)}

    def load_sem_seg(self, i: int) -> np.ndarray:
        path = self.entries[i].label_path
        return self.train_ids(read_label_png(path), path)


# --------------------------------------------------------------------------------------
# File helpers with errors that name the file.


def require_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise DataError(f"{path}: missing {what}")
    return Path(path)


def require_dir(path: Path, what: str) -> Path:
    if not Path(path).is_dir():
        raise DataError(f"{path}: missing {what} (a folder)")
    return Path(path)


def read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc})") from None


def field_of(obj: Any, key: str, where: str, types: type | tuple[type, ...] = object) -> Any:
    """``obj[key]`` with a :class:`DataError` naming ``where`` and the key when absent/mistyped."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise DataError(f"{where}: field {key!r} should be {names}, got {value!r:.80}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _open(path: Path, what: str) -> Image.Image:
    require_file(path, what)
    try:
        img = Image.open(path)
        img.load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None
    return img


def read_image(path: Path) -> np.ndarray:
    """An RGB image as uint8 ``[H, W, 3]``."""
    return np.array(_open(path, "image").convert("RGB"))


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label PNG (ADE20K, Cityscapes labelIds, our predictions) as an array."""
    img = _open(path, "label PNG")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"{path}: expected a single-channel label PNG, got mode {img.mode}")
    return np.array(img)


def read_panoptic_png(path: Path) -> np.ndarray:
    """A COCO panoptic PNG as its segment ids, id = R + 256 G + 256^2 B (int32 ``[H, W]``)."""
    img = _open(path, "panoptic PNG")
    if img.mode != "RGB":
        raise DataError(f"{path}: a panoptic PNG must be RGB, got mode {img.mode}")
    return rgb2id(np.array(img))


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def check_size(path: Path, got: tuple[int, ...], want: tuple[int, int], what: str) -> None:
    if tuple(got[:2]) != tuple(want):
        raise DataError(f"{path}: {what} is {got[0]}x{got[1]}, the image is {want[0]}x{want[1]}")
