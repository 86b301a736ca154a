"""``hcformer prepare-data`` and ``hcformer check-data``: the official downloads, made readable.

The readers (:mod:`hcformer.data`) read each dataset in the layout its official zip files
unpack to, and derive what they need per image (COCO's semantic view of a panoptic PNG,
ADE20K's ``label - 1`` with 0 -> 255, Cityscapes' labelIds -> train ids) when they load it.
So after unzipping, one step is left:

- ``coco_panoptic``: ``panoptic_annotations_trainval2017.zip`` holds the PNGs as two more zips,
  ``annotations/panoptic_{train,val}2017.zip``; prepare-data extracts them to
  ``annotations/panoptic_{train,val}2017/`` (each PNG checked against the zip's size);
- ``coco_instance``, ``ade20k``, ``cityscapes``: nothing to convert; prepare-data checks the
  layout (every file the readers open: the JSONs, and each image with its label).

``--detectron2`` also writes the files detectron2/Mask2Former (the authors' code) read and the
project does not, for comparisons with it, as their preparation scripts do:
``panoptic_semseg_{split}/`` (COCO: each segment its category's contiguous id, crowd segments
included, VOID 255), ``*_gtFine_labelTrainIds.png`` (Cityscapes: cityscapesscripts' label
table applied to the labelIds, which equals its ``createTrainIdLabelImgs``: both PNGs are drawn
from the same polygons in the same order) and ``annotations_detectron2/{split}/`` (ADE20K:
label - 1, 0 -> 255).

Every output is written under a temporary name (``<name>.partial``) and renamed, so an
interrupted run leaves whole files only and the next run makes just the missing ones; a run
with nothing missing writes nothing and says so. Conversions run in ``--workers`` processes.

:func:`check_layout` walks the layout and names the first missing file with the exact command
that makes it; ``hcformer check-data`` (:mod:`hcformer.data.check`) runs it for every dataset
of a scale's experiments, and checks their pretrained weights.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from PIL import Image
from tqdm import tqdm

from hcformer.data.ade20k import ADE20KDataset, categories, label_to_train_ids
from hcformer.data.base import read_label_png, read_panoptic_png
from hcformer.data.cityscapes import CityscapesDataset
from hcformer.data.coco_instance import COCOInstanceDataset
from hcformer.data.coco_panoptic import COCOPanopticDataset, panoptic_paths, panoptic_to_semantic
from hcformer.errors import DataError

DATASETS = ("coco_panoptic", "coco_instance", "ade20k", "cityscapes")
# The splits of each official release the paper trains and evaluates on.
SPLITS = {
    "coco_panoptic": ("train2017", "val2017"),
    "coco_instance": ("train2017", "val2017"),
    "ade20k": ("training", "validation"),
    "cityscapes": ("train", "val"),
}
PARTIAL = ".partial"
COCO_URL = "http://images.cocodataset.org"
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


class MissingInput(DataError):
    """A file or folder of the layout is missing; ``command`` makes it."""

    def __init__(self, path: Path, what: str, command: str) -> None:
        self.path, self.what, self.command = Path(path), what, command
        super().__init__(f"missing {path} ({what}); make it with: {command}")


# --------------------------------------------------------------------------------------------
# The commands that make each part of a layout.


def _unzip(url: str, dest: Path) -> str:
    name = url.rsplit("/", 1)[1]
    return f"wget {url} && unzip -q {name} -d {dest}"


def prepare_command(dataset: str, root: Path, detectron2: bool = False) -> str:
    flag = " --detectron2" if detectron2 else ""
    return f"hcformer prepare-data --dataset {dataset} --root {root}{flag}"


def coco_images_command(root: Path, split: str) -> str:
    return _unzip(f"{COCO_URL}/zips/{split}.zip", root)


def coco_panoptic_command(root: Path) -> str:
    return _unzip(f"{COCO_URL}/annotations/panoptic_annotations_trainval2017.zip", root)


def coco_instances_command(root: Path) -> str:
    return _unzip(f"{COCO_URL}/annotations/annotations_trainval2017.zip", root)


def ade_base(root: Path) -> Path:
    root = Path(root)
    return root if root.name == "ADEChallengeData2016" else root / "ADEChallengeData2016"


def ade_command(root: Path) -> str:
    return _unzip(ADE_URL, ade_base(root).parent)


def cityscapes_command(root: Path, package: str) -> str:
    # The site needs an account; cityscapesscripts' csDownload asks for it.
    return f"csDownload -d . {package} && unzip -q {package} -d {root}"


def _need(path: Path, what: str, command: str, folder: bool = False) -> Path:
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        raise MissingInput(path, what, command)
    return path


# --------------------------------------------------------------------------------------------
# Layout checks: every file a reader opens, in the order a user makes them.


def _coco_panoptic_png_command(root: Path, split: str) -> str:
    if (Path(root) / "annotations" / f"panoptic_{split}.zip").is_file():
        return prepare_command("coco_panoptic", root)
    return coco_panoptic_command(root)


def _check_coco_panoptic(root: Path, split: str, instances: bool) -> int:
    gt_json, gt_dir = panoptic_paths(root, split)
    _need(root / split, f"COCO {split} images", coco_images_command(root, split), folder=True)
    _need(gt_json, "COCO panoptic annotations", coco_panoptic_command(root))
    png_cmd = _coco_panoptic_png_command(root, split)
    _need(gt_dir, f"COCO panoptic PNGs of {split}", png_cmd, folder=True)
    if instances:
        inst = root / "annotations" / f"instances_{split}.json"
        _need(inst, "COCO instances of the same images (ap_th_pan)", coco_instances_command(root))
    ds = COCOPanopticDataset(root, split)
    for e in ds.entries:
        _need(e.image_path, f"COCO {split} image", coco_images_command(root, split))
        _need(e.label_path, f"COCO panoptic PNG of image {e.image_id}", png_cmd)
    return len(ds)


def _check_coco_instance(root: Path, split: str) -> int:
    _need(root / split, f"COCO {split} images", coco_images_command(root, split), folder=True)
    inst = root / "annotations" / f"instances_{split}.json"
    _need(inst, "COCO instance annotations", coco_instances_command(root))
    ds = COCOInstanceDataset(root, split)
    for e in ds.entries:
        _need(e.image_path, f"COCO {split} image", coco_images_command(root, split))
    return len(ds)


def _check_pairs(
    images: list[Path], labels: list[Path], image_of: Callable[[Path], Path], label_of, cmd: str
) -> None:
    """Every image has its label and every label its image (a half-unzipped release)."""
    for image in images:
        _need(label_of(image), "label of the image", cmd)
    for label in labels:
        _need(image_of(label), "image of the label", cmd)


def _check_ade20k(root: Path, split: str) -> int:
    base = ade_base(root)
    cmd = ade_command(root)
    image_dir = _need(base / "images" / split, f"ADE20K {split} images", cmd, folder=True)
    label_dir = _need(base / "annotations" / split, f"ADE20K {split} labels", cmd, folder=True)
    images, labels = sorted(image_dir.glob("*.jpg")), sorted(label_dir.glob("*.png"))
    _check_pairs(
        images,
        labels,
        lambda p: image_dir / f"{p.stem}.jpg",
        lambda p: label_dir / f"{p.stem}.png",
        cmd,
    )
    return len(ADE20KDataset(root, split))


def _check_cityscapes(root: Path, split: str) -> int:
    img_cmd = cityscapes_command(root, "leftImg8bit_trainvaltest.zip")
    gt_cmd = cityscapes_command(root, "gtFine_trainvaltest.zip")
    image_dir = _need(root / "leftImg8bit" / split, f"Cityscapes {split} images", img_cmd, True)
    gt_dir = _need(root / "gtFine" / split, f"Cityscapes {split} gtFine", gt_cmd, True)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    labels = sorted(gt_dir.glob("*/*_gtFine_labelIds.png"))
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        _need(gt_dir / image.parent.name / f"{stem}_gtFine_labelIds.png", "labelIds", gt_cmd)
    for label in labels:
        stem = label.name[: -len("_gtFine_labelIds.png")]
        path = image_dir / label.parent.name / f"{stem}_leftImg8bit.png"
        _need(path, "image of the labelIds", img_cmd)
    return len(CityscapesDataset(root, split))


def check_layout(
    dataset: str,
    root: Path,
    splits: Sequence[str] | None = None,
    *,
    instances: bool = True,
    detectron2: bool = False,
) -> dict[str, int]:
    """Images per split; raises :class:`MissingInput` at the first missing file.

    ``instances``: coco_panoptic also needs ``instances_{split}.json`` (for ``ap_th_pan``);
    ``detectron2``: the files ``prepare-data --detectron2`` writes must be there too.
    """
    if dataset not in DATASETS:
        raise DataError(f"--dataset: {dataset!r} is not one of {list(DATASETS)}")
    root = Path(root)
    counts = {}
    for split in splits or SPLITS[dataset]:
        if dataset == "coco_panoptic":
            counts[split] = _check_coco_panoptic(root, split, instances)
        elif dataset == "coco_instance":
            counts[split] = _check_coco_instance(root, split)
        elif dataset == "ade20k":
            counts[split] = _check_ade20k(root, split)
        else:
            counts[split] = _check_cityscapes(root, split)
        if detectron2:
            cmd = prepare_command(dataset, root, detectron2=True)
            for job in derived_jobs(dataset, root, split):
                _need(job.dst, "a detectron2 file", cmd)
    return counts


# --------------------------------------------------------------------------------------------
# Conversions: one job per output file.


@dataclass(frozen=True)
class Job:
    """Make ``dst`` from ``src`` with ``kind`` (see :func:`_make`); ``arg`` is kind-specific."""

    kind: str
    src: Path
    dst: Path
    arg: object = None


def partial_name(dst: Path) -> Path:
    return dst.with_name(dst.name + PARTIAL)


def _save_png(array, dst: Path) -> None:
    tmp = partial_name(dst)
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, dst)


def _make(job: Job) -> None:
    """Write one output (temporary name, then rename)."""
    job.dst.parent.mkdir(parents=True, exist_ok=True)
    if job.kind == "coco_semantic":
        _save_png(panoptic_to_semantic(read_panoptic_png(job.src), job.arg), job.dst)
    elif job.kind == "ade_detectron2":
        label = read_label_png(job.src)
        _save_png(label_to_train_ids(label, int(job.arg), job.src), job.dst)
    elif job.kind == "cityscapes_train_ids":
        _save_png(cityscapes_train_id_lut()[read_label_png(job.src)], job.dst)
    else:  # pragma: no cover - the kinds above are the only ones made
        raise ValueError(job.kind)


def cityscapes_train_id_lut():
    """labelId -> trainId from cityscapesscripts' label table (255 for ignored and -1)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label in cityscapes_labels:
        if 0 <= label.id < 256:
            lut[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
    return lut


def derived_jobs(dataset: str, root: Path, split: str) -> list[Job]:
    """The ``--detectron2`` outputs of a split (coco_instance has none)."""
    root = Path(root)
    if dataset == "coco_panoptic":
        ds = COCOPanopticDataset(root, split)
        out = root / f"panoptic_semseg_{split}"
        return [
            Job("coco_semantic", e.label_path, out / e.label_path.name, ds.segments(e))
            for e in ds.entries
        ]
    if dataset == "ade20k":
        base = ade_base(root)
        k = len(categories(root))
        out = base / "annotations_detectron2" / split
        labels = sorted((base / "annotations" / split).glob("*.png"))
        return [Job("ade_detectron2", p, out / p.name, k) for p in labels]
    if dataset == "cityscapes":
        labels = sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
        return [
            Job(
                "cityscapes_train_ids",
                p,
                p.with_name(p.name.replace("_labelIds", "_labelTrainIds")),
            )
            for p in labels
        ]
    return []


def run_jobs(jobs: Sequence[Job], desc: str, workers: int) -> int:
    """Make the outputs that are missing; returns how many were made."""
    todo = [j for j in jobs if not j.dst.is_file()]
    if not todo:
        return 0
    bar = tqdm(total=len(todo), desc=desc, unit="file", disable=None)
    if workers > 1 and len(todo) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_make, todo, chunksize=32):
                bar.update()
    else:
        for job in todo:
            _make(job)
            bar.update()
    bar.close()
    return len(todo)


def extract_panoptic_pngs(root: Path, split: str) -> tuple[int, int]:
    """Unzip ``annotations/panoptic_{split}.zip`` next to it; (extracted, already there).

    A PNG is taken as there when its size is the zip's (an interrupted ``unzip`` leaves a
    shorter file under the final name; this writes ``.partial`` names and renames).
    """
    annotations = Path(root) / "annotations"
    archive = annotations / f"panoptic_{split}.zip"
    if not archive.is_file():
        return 0, 0
    made = present = 0
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir() and m.filename.endswith(".png")]
        todo = []
        for m in members:
            dst = annotations / m.filename
            if dst.is_file() and dst.stat().st_size == m.file_size:
                present += 1
            else:
                todo.append((m, dst))
        for m, dst in tqdm(todo, desc=f"unzip {archive.name}", unit="file", disable=None):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_name(dst)
            with zf.open(m) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dst)
            made += 1
    return made, present


def prepare(
    dataset: str,
    root: Path,
    splits: Sequence[str] | None = None,
    *,
    detectron2: bool = False,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> int:
    """Turn an unzipped official release into the readers' layout; returns files written."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset: {dataset!r} is not one of {list(DATASETS)}")
    root = Path(root)
    written = 0
    for split in splits or SPLITS[dataset]:
        if dataset == "coco_panoptic":
            made, present = extract_panoptic_pngs(root, split)
            if made or present:
                log(f"{dataset} {split}: panoptic PNGs: {made} extracted, {present} present")
            written += made
        counts = check_layout(dataset, root, [split], instances=False)
        if detectron2:
            jobs = derived_jobs(dataset, root, split)
            made = run_jobs(jobs, f"{dataset} {split}", workers)
            log(f"{dataset} {split}: detectron2 files: {made} written, {len(jobs) - made} present")
            written += made
        log(f"{dataset} {split}: layout complete ({counts[split]} images)")
    if not written:
        log(f"prepare-data: {dataset} at {root}: nothing to do (already prepared)")
    return written
