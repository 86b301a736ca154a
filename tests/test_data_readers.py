"""Readers on the real samples (tests/fixtures): class sets, label mappings, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcformer.config import DataConfig
from hcformer.data import build_dataset, panoptic_to_semantic
from hcformer.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures"


def blank_jpg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


@pytest.fixture()
def ade_root(tmp_path) -> Path:
    base = tmp_path / "ade" / "ADEChallengeData2016"
    (base / "annotations" / "validation").mkdir(parents=True)
    for f in sorted((FIX / "ade20k_val").glob("ADE_val_*.png")):
        shutil.copy(f, base / "annotations" / "validation" / f.name)
        h, w = np.asarray(Image.open(f)).shape
        blank_jpg(base / "images" / "validation" / f"{f.stem}.jpg", h, w)
    return tmp_path / "ade"


def test_ade20k_real_labels_read_into_150_classes(ade_root):
    cfg = DataConfig(dataset="ade20k", task="semantic", root=str(ade_root), val_split="validation")
    ds = build_dataset(cfg, "val")
    assert ds.num_classes == 150 and len(ds) == 3
    assert [c["train_id"] for c in ds.categories] == list(range(150))
    assert ds.categories[0]["name"] == "wall" and ds.categories[149]["name"] == "flag"
    assert ds.gt_dir == ade_root / "ADEChallengeData2016" / "annotations" / "validation"
    r = ds.load(0)
    raw = np.asarray(Image.open(FIX / "ade20k_val" / "ADE_val_00000001.png")).astype(int)
    sem = r.target["sem_seg"]
    assert r.stem == "ADE_val_00000001" and r.image.shape == (*raw.shape, 3)
    assert np.array_equal(sem[raw == 0], np.full((raw == 0).sum(), 255))
    assert np.array_equal(sem[raw > 0], raw[raw > 0] - 1)
    assert np.array_equal(ds.load_sem_seg(0), sem)


def test_cityscapes_real_frame_reads_19_train_ids(tmp_path):
    src = FIX / "cityscapes_val"
    stem = "frankfurt_000000_000294"
    (tmp_path / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    shutil.copy(src / f"{stem}_gtFine_labelIds.png", tmp_path / "gtFine" / "val" / "frankfurt")
    blank_jpg(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", 128, 256)
    cfg = DataConfig(dataset="cityscapes", task="semantic", root=str(tmp_path), val_split="val")
    ds = build_dataset(cfg, "val")
    assert ds.num_classes == 19 and len(ds.thing_train_ids) == 8
    assert [c["name"] for c in ds.categories[:3]] == ["road", "sidewalk", "building"]
    r = ds.load(0)
    assert r.stem == stem and r.file_name == f"frankfurt/{stem}_leftImg8bit.png"
    label_ids = np.asarray(Image.open(src / f"{stem}_gtFine_labelIds.png"))
    sem = r.target["sem_seg"]
    assert set(np.unique(sem).tolist()) <= set(range(19)) | {255}
    assert (sem[label_ids <= 6] == 255).all()  # unlabeled .. ground are ignored
    assert (sem[label_ids == 7] == 0).all() and (sem[label_ids == 26] == 13).all()


@pytest.fixture()
def coco_root(tmp_path) -> Path:
    src = FIX / "coco_panoptic_val2017"
    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    shutil.copy(src / "panoptic_examples.json", ann / "panoptic_val2017.json")
    shutil.copytree(src / "panoptic_examples", ann / "panoptic_val2017")
    for img in json.loads((src / "panoptic_examples.json").read_text())["images"]:
        blank_jpg(tmp_path / "coco" / "val2017" / img["file_name"], img["height"], img["width"])
    return tmp_path / "coco"


def test_coco_panoptic_real_annotations(coco_root):
    cfg = DataConfig(dataset="coco_panoptic", task="panoptic", root=str(coco_root))
    ds = build_dataset(cfg, "val")
    assert ds.num_classes == 133 and len(ds.thing_train_ids) == 80 and len(ds) == 2
    ids = [c["id"] for c in ds.categories]
    assert ids == sorted(ids) and ds.categories[0]["name"] == "person"
    assert ds.thing_train_ids == list(range(80))  # things (ids 1-90) come first
    assert ds.instances_json is None  # not in this sample
    r = ds.load(0)
    ann = json.loads((coco_root / "annotations" / "panoptic_val2017.json").read_text())[
        "annotations"
    ][0]
    pan = r.target["pan_seg"]
    assert set(np.unique(pan).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
    for s, info in zip(r.target["segments"], ann["segments_info"]):
        assert s["area"] == info["area"] == (pan == info["id"]).sum()
        assert s["label"] == ids.index(info["category_id"])
    sem = ds.load_sem_seg(0)
    assert (sem[pan == 0] == 255).all()
    for s in r.target["segments"]:  # crowd segments keep their category (Mask2Former's view)
        assert (sem[pan == s["id"]] == s["label"]).all()


def test_panoptic_to_semantic_small_case():
    pan = np.array([[0, 5, 5], [7, 7, 9]])
    segs = [{"id": 5, "label": 3}, {"id": 7, "label": 0}, {"id": 9, "label": 3}]
    assert panoptic_to_semantic(pan, segs).tolist() == [[255, 3, 3], [0, 0, 3]]


def test_coco_instance_real_annotations_match_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    src = FIX / "coco_instances_val2014" / "instances_val2014_100.json"
    ann_dir = tmp_path / "coco" / "annotations"
    ann_dir.mkdir(parents=True)
    shutil.copy(src, ann_dir / "instances_val2014.json")
    data = json.loads(src.read_text())
    crowd_images = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    picks = [data["images"][0], next(i for i in data["images"] if i["id"] in crowd_images)]
    for img in picks:
        blank_jpg(tmp_path / "coco" / "val2014" / img["file_name"], img["height"], img["width"])
    cfg = DataConfig(
        dataset="coco_instance", task="instance", root=str(tmp_path / "coco"), val_split="val2014"
    )
    ds = build_dataset(cfg, "val")
    assert ds.num_classes == 80 and len(ds) == 100
    coco = COCO(str(src))
    for img in picks:
        i = ds.image_ids.index(img["id"])
        t = ds.load(i).target
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(t["masks"]) == len(anns)
        for m, label, crowd, a in zip(t["masks"], t["labels"], t["iscrowd"], anns):
            assert np.array_equal(m, coco.annToMask(a).astype(bool))  # polygons and RLE
            assert ds.categories[label]["id"] == a["category_id"] and crowd == bool(a["iscrowd"])
    assert any(ds.load(ds.image_ids.index(picks[1]["id"])).target["iscrowd"])


def test_missing_files_and_malformed_fields(coco_root, tmp_path):
    cfg = DataConfig(dataset="coco_panoptic", task="panoptic", root=str(tmp_path / "nowhere"))
    with pytest.raises(
        DataError, match=r"nowhere/annotations/panoptic_val2017.json: missing COCO panoptic"
    ):
        build_dataset(cfg, "val")
    js = coco_root / "annotations" / "panoptic_val2017.json"
    data = json.loads(js.read_text())
    data["images"][1]["file_name"] = 17
    js.write_text(json.dumps(data))
    cfg = DataConfig(dataset="coco_panoptic", task="panoptic", root=str(coco_root))
    with pytest.raises(
        DataError, match=r"panoptic_val2017.json: images\[1\]: field 'file_name' should be str"
    ):
        build_dataset(cfg, "val")
    data["images"][1]["file_name"] = "000000439180.jpg"
    data["annotations"][0]["segments_info"][2]["category_id"] = 9999
    js.write_text(json.dumps(data))
    ds = build_dataset(cfg, "val")
    with pytest.raises(
        DataError, match=r"segments_info\[2\]: category_id 9999 is not among the categories"
    ):
        ds.load(0)
    (coco_root / "annotations" / "panoptic_val2017" / "000000439180.png").unlink()
    with pytest.raises(DataError, match=r"panoptic_val2017/000000439180.png: missing panoptic PNG"):
        ds.load(1)
    js.write_text("{not json")
    with pytest.raises(
        DataError, match=r"panoptic_val2017.json: COCO panoptic annotations is not valid JSON"
    ):
        build_dataset(cfg, "val")
    with pytest.raises(
        ConfigError, match=r"data.task: 'semantic' does not fit data.dataset 'coco_panoptic'"
    ):
        build_dataset(
            DataConfig(dataset="coco_panoptic", task="semantic", root=str(coco_root)), "val"
        )


def test_ade20k_errors(ade_root):
    cfg = DataConfig(dataset="ade20k", task="semantic", root=str(ade_root), train_split="training")
    with pytest.raises(
        DataError, match=r"images/training: missing ADE20K images of split 'training'"
    ):
        build_dataset(cfg, "train")
    info = ade_root / "ADEChallengeData2016" / "objectInfo150.csv"
    info.write_text("Idx,Ratio,Train,Val,Stuff,Name\n1,0,0,0,1,wall\n2,0,0,0,1,building\n")
    ds = build_dataset(
        DataConfig(dataset="ade20k", task="semantic", root=str(ade_root), val_split="validation"),
        "val",
    )
    assert ds.num_classes == 2
    with pytest.raises(
        DataError, match=r"ADE_val_00000001.png: label value \d+ exceeds the 2 classes"
    ):
        ds.load(0)
    info.write_text("Idx,Ratio,Train,Val,Stuff,Name\nx,0,0,0,1,wall\n")
    with pytest.raises(DataError, match=r"objectInfo150.csv: line 2: expected columns Idx"):
        build_dataset(
            DataConfig(
                dataset="ade20k", task="semantic", root=str(ade_root), val_split="validation"
            ),
            "val",
        )


def test_coco_instance_degenerate_and_malformed_segmentation(tmp_path):
    src = FIX / "coco_instances_val2014" / "instances_val2014_100.json"
    data = json.loads(src.read_text())
    img = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
    anns[0]["segmentation"] = [[1, 1, 5, 5]]  # two points: dropped, as detectron2
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    blank_jpg(root / "val2014" / img["file_name"], img["height"], img["width"])
    cfg = DataConfig(dataset="coco_instance", task="instance", root=str(root), val_split="val2014")
    ds = build_dataset(cfg, "val")
    n = sum(a["image_id"] == img["id"] for a in data["annotations"])
    assert len(ds.load(0).target["masks"]) == n - 1
    anns[1]["segmentation"] = "oops"
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    j = data["annotations"].index(anns[1])
    with pytest.raises(DataError, match=rf"annotations\[{j}\]: malformed field 'segmentation'"):
        build_dataset(cfg, "val").load(0)


def test_cli_reports_a_missing_folder_in_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hcformer.cli", "evaluate-semantic", "--dataset", "ade20k"]
    cmd += [
        "--gt-dir",
        str(tmp_path / "nope"),
        "--pred-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "m.json"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hcformer evaluate-semantic: error: {tmp_path / 'nope'}: missing ground-truth folder"
    ]


def test_packed_list_gives_back_the_items_and_slices():
    from hcformer.data.base import ImageEntry, PackedList

    items = [
        ImageEntry(i, f"{i:06d}.jpg", f"{i:06d}", Path(f"/x/{i}.jpg"), extra={"segments": [i]})
        for i in range(5)
    ]
    packed = PackedList(items)
    assert len(packed) == 5 and list(packed) == items
    assert packed[-1] == items[-1] and packed[2].extra == {"segments": [2]}
    assert isinstance(packed[1:4], PackedList) and list(packed[1:4]) == items[1:4]
    assert list(packed[:0]) == [] and len(PackedList([])) == 0
    with pytest.raises(IndexError, match="index 5 out of range"):
        packed[5]


def test_coco_instance_train_split_drops_images_without_instances(tmp_path):
    """detectron2's FILTER_EMPTY_ANNOTATIONS (the authors' COCO configs): training leaves out
    images whose annotations are none, crowds only, or only unusable polygons; val keeps all."""
    square = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    crowd_rle = {"counts": [20, 10, 370], "size": [20, 20]}  # uncompressed, column-major

    def ann(j: int, image_id: int, seg, iscrowd: int = 0) -> dict:
        return {"id": j, "image_id": image_id, "category_id": 1, "segmentation": seg,
                "iscrowd": iscrowd, "area": 100.0, "bbox": [2, 2, 10, 10]}  # fmt: skip

    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 20} for i in range(1, 6)
    ]
    data = {
        "images": images,
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            ann(1, 1, square),  # kept: one instance
            ann(2, 2, crowd_rle, iscrowd=1),  # crowd only: dropped
            # image 3 has no annotation: dropped
            ann(3, 4, [[1.0, 1.0, 5.0, 5.0]]),  # a two-point polygon only: dropped
            ann(4, 5, crowd_rle, iscrowd=1),  # a crowd and an instance: kept
            ann(5, 5, square),
        ],
    }
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for img in images:
            blank_jpg(root / split / img["file_name"], 20, 20)
    cfg = DataConfig(dataset="coco_instance", task="instance", root=str(root))
    train = build_dataset(cfg, "train")
    assert train.image_ids == [1, 5]
    assert [len(train.load(i).target["masks"]) for i in range(2)] == [1, 2]
    assert build_dataset(cfg, "val").image_ids == [1, 2, 3, 4, 5]


def test_coco_panoptic_train_split_keeps_images_with_crowds_only(coco_root):
    """detectron2 filters only dataset dicts with "annotations", which its COCO panoptic
    loader does not give: the authors trained on every panoptic image."""
    js = coco_root / "annotations" / "panoptic_val2017.json"
    data = json.loads(js.read_text())
    for seg in data["annotations"][0]["segments_info"]:
        seg["iscrowd"] = 1
    js.write_text(json.dumps(data))
    cfg = DataConfig(
        dataset="coco_panoptic", task="panoptic", root=str(coco_root), train_split="val2017"
    )
    train = build_dataset(cfg, "train")
    assert len(train) == 2 and all(s["iscrowd"] for s in train.load(0).target["segments"])
