"""prepare-data, check-data and fetch-weights on small trees in the official layouts.

The trees hold the real annotations of tests/fixtures (COCO panoptic val2017 PNGs and JSON,
the COCO instances sample, ADE20K and Cityscapes val labels) with blank images; the outputs
are compared with references computed here from the annotations themselves (the segments'
categories, label - 1, the fixture's own labelTrainIds.png). No network: the download
function is replaced by one that writes a tiny valid checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcformer.config import build_config
from hcformer.data import build_dataset
from hcformer.data.check import check_scale, scale_needs
from hcformer.data.prepare import MissingInput, check_layout, prepare
from hcformer.experiments import pretrained_weights

FIX = Path(__file__).parent / "fixtures"
PAN = FIX / "coco_panoptic_val2017"
CITY = FIX / "cityscapes_val"
STEM = "frankfurt_000000_000294"


def blank_jpg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


def coco_tree(root: Path, splits=("val2017",)) -> Path:
    """COCO as the official zips unpack: images, the panoptic JSON and the PNGs' inner zip."""
    data = json.loads((PAN / "panoptic_examples.json").read_text())
    ann = root / "annotations"
    ann.mkdir(parents=True)
    for split in splits:
        (ann / f"panoptic_{split}.json").write_text(json.dumps(data))
        with zipfile.ZipFile(ann / f"panoptic_{split}.zip", "w") as zf:
            for a in data["annotations"]:
                zf.write(
                    PAN / "panoptic_examples" / a["file_name"], f"panoptic_{split}/{a['file_name']}"
                )
        (ann / f"instances_{split}.json").write_text("{}")
        for img in data["images"]:
            blank_jpg(root / split / img["file_name"], img["height"], img["width"])
    return root


def semantic_reference(png: Path, segments: list[dict], categories: list[dict]) -> np.ndarray:
    """Each segment's pixels get its category's index among the ids sorted; VOID 255."""
    rgb = np.array(Image.open(png).convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    order = sorted(c["id"] for c in categories)
    out = np.full(ids.shape, 255, dtype=np.uint8)
    for s in segments:
        out[ids == s["id"]] = order.index(s["category_id"])
    return out


def test_coco_panoptic_pngs_extracted_and_semantic_maps_match_the_segments(tmp_path, capsys):
    root = coco_tree(tmp_path / "coco")
    with pytest.raises(MissingInput) as err:  # before preparing: the PNG folder, and the command
        check_layout("coco_panoptic", root, ["val2017"])
    assert err.value.path == root / "annotations" / "panoptic_val2017"
    assert err.value.command == f"hcformer prepare-data --dataset coco_panoptic --root {root}"

    written = prepare("coco_panoptic", root, ["val2017"], detectron2=True)
    assert written == 2 + 2  # two PNGs extracted, two semantic maps
    data = json.loads((PAN / "panoptic_examples.json").read_text())
    for a in data["annotations"]:
        png = root / "annotations" / "panoptic_val2017" / a["file_name"]
        assert png.read_bytes() == (PAN / "panoptic_examples" / a["file_name"]).read_bytes()
        sem = np.array(Image.open(root / "panoptic_semseg_val2017" / a["file_name"]))
        ref = semantic_reference(png, a["segments_info"], data["categories"])
        np.testing.assert_array_equal(sem, ref)
        present = set(np.unique(sem)) - {255}
        assert len(present) == len({s["category_id"] for s in a["segments_info"]}) > 3
    assert check_layout("coco_panoptic", root, ["val2017"], detectron2=True) == {"val2017": 2}

    capsys.readouterr()
    assert prepare("coco_panoptic", root, ["val2017"], detectron2=True) == 0
    assert "nothing to do (already prepared)" in capsys.readouterr().out

    cfg = build_config(
        {"data": {"dataset": "coco_panoptic", "task": "panoptic", "root": str(root)}}
    ).data
    rec = build_dataset(cfg, "val").load(0)
    assert rec.image.shape == (427, 640, 3) and len(rec.target["segments"]) > 3


def test_an_interrupted_run_is_completed(tmp_path):
    """Missing and truncated PNGs (an interrupted unzip) and a half-written semantic map."""
    root = coco_tree(tmp_path / "coco")
    prepare("coco_panoptic", root, ["val2017"], detectron2=True)
    pngs = sorted((root / "annotations" / "panoptic_val2017").glob("*.png"))
    sems = sorted((root / "panoptic_semseg_val2017").glob("*.png"))
    want = {p: p.read_bytes() for p in pngs + sems}
    pngs[0].unlink()
    pngs[1].write_bytes(want[pngs[1]][:100])
    sems[1].unlink()
    (sems[1].parent / f"{sems[1].name}.partial").write_bytes(b"\x89PNG half")
    assert prepare("coco_panoptic", root, ["val2017"], detectron2=True) == 3
    assert {p: p.read_bytes() for p in pngs + sems} == want
    assert not list(root.rglob("*.partial"))


def test_cityscapes_train_ids_equal_the_official_ones(tmp_path):
    from cityscapesscripts.helpers.labels import labels

    from hcformer.data.cityscapes import LABEL_TO_TRAIN, label_ids_to_train_ids

    root = tmp_path / "cityscapes"
    gt = root / "gtFine" / "val" / "frankfurt"
    gt.mkdir(parents=True)
    for kind in ("labelIds", "instanceIds"):
        shutil.copy(CITY / f"{STEM}_gtFine_{kind}.png", gt)
    blank_jpg(root / "leftImg8bit" / "val" / "frankfurt" / f"{STEM}_leftImg8bit.png", 128, 256)
    assert prepare("cityscapes", root, ["val"]) == 0  # the reader needs nothing more
    assert prepare("cityscapes", root, ["val"], detectron2=True) == 1
    out = np.array(Image.open(gt / f"{STEM}_gtFine_labelTrainIds.png"))
    label_ids = np.array(Image.open(gt / f"{STEM}_gtFine_labelIds.png"))
    official = np.array(Image.open(CITY / f"{STEM}_gtFine_labelTrainIds.png"))
    # The fixture's two PNGs were downscaled separately: they agree on 99.8% of the pixels.
    assert (out == official).mean() > 0.995
    np.testing.assert_array_equal(out, label_ids_to_train_ids(label_ids))
    # The reader's table is cityscapesscripts' (every id; -1 and 255 train ids are ignored).
    for label in labels:
        if 0 <= label.id < 256:
            assert LABEL_TO_TRAIN[label.id] == (label.trainId if 0 <= label.trainId < 255 else 255)
    ds = build_dataset(
        build_config(
            {
                "data": {
                    "dataset": "cityscapes",
                    "task": "semantic",
                    "root": str(root),
                    "val_split": "val",
                }
            }
        ).data,
        "val",
    )
    np.testing.assert_array_equal(ds.load(0).target["sem_seg"], out)


def test_ade20k_needs_no_conversion_and_detectron2_labels_are_shifted(tmp_path, capsys):
    base = tmp_path / "ADEChallengeData2016"
    labels = sorted((FIX / "ade20k_val").glob("ADE_val_*.png"))
    for split in ("training", "validation"):
        for p in labels:
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, base / "annotations" / split / p.name)
            h, w = np.array(Image.open(p)).shape
            blank_jpg(base / "images" / split / f"{p.stem}.jpg", h, w)
    assert prepare("ade20k", base) == 0
    assert "nothing to do" in capsys.readouterr().out
    prepare("ade20k", base, detectron2=True)
    for p in labels:
        raw = np.array(Image.open(p)).astype(np.int64)
        got = np.array(Image.open(base / "annotations_detectron2" / "validation" / p.name))
        np.testing.assert_array_equal(got, np.where(raw == 0, 255, raw - 1))
    (base / "images" / "validation" / f"{labels[1].stem}.jpg").unlink()  # a half-unzipped release
    with pytest.raises(MissingInput) as err:
        check_layout("ade20k", base)
    assert err.value.path == base / "images" / "validation" / f"{labels[1].stem}.jpg"
    assert "ADEChallengeData2016.zip && unzip -q ADEChallengeData2016.zip -d" in err.value.command
    ds = build_dataset(
        build_config(
            {
                "data": {
                    "dataset": "ade20k",
                    "task": "semantic",
                    "root": str(base),
                    "train_split": "training",
                }
            }
        ).data,
        "train",
    )
    rec = ds.load(0)
    shifted = np.array(Image.open(base / "annotations_detectron2" / "training" / f"{rec.stem}.png"))
    np.testing.assert_array_equal(rec.target["sem_seg"], shifted)


def test_coco_instance_check_names_the_first_missing_image(tmp_path):
    root = tmp_path / "coco"
    data = json.loads((FIX / "coco_instances_val2014" / "instances_val2014_100.json").read_text())
    (root / "annotations").mkdir(parents=True)
    shutil.copy(
        FIX / "coco_instances_val2014" / "instances_val2014_100.json",
        root / "annotations" / "instances_val2017.json",
    )
    for img in data["images"][:-3]:
        (root / "val2017").mkdir(exist_ok=True)
        (root / "val2017" / img["file_name"]).write_bytes(b"")  # the check opens no image
    with pytest.raises(MissingInput) as err:
        check_layout("coco_instance", root, ["val2017"])
    assert err.value.path == root / "val2017" / data["images"][-3]["file_name"]
    assert err.value.command == (
        f"wget http://images.cocodataset.org/zips/val2017.zip && unzip -q val2017.zip -d {root}"
    )


def hcformer(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hcformer.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_data_names_the_first_missing_input_in_one_line(tmp_path):
    weights = tmp_path / "w"
    env = {"HCFORMER_WEIGHTS": str(weights), "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = hcformer(
        "check-data", "--scale", "paper", "--dataset", "coco_panoptic", cwd=tmp_path, env=env
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert out.stderr == (
        "hcformer check-data: error: missing datasets/coco/train2017 (COCO train2017 images); "
        "make it with: wget http://images.cocodataset.org/zips/train2017.zip && "
        "unzip -q train2017.zip -d datasets/coco\n"
    )
    root = coco_tree(tmp_path / "datasets" / "coco", splits=("train2017", "val2017"))
    prepare("coco_panoptic", root)
    out = hcformer(
        "check-data", "--scale", "paper", "--dataset", "coco_panoptic", cwd=tmp_path, env=env
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert (
        "missing " + str(weights) in out.stderr
        and "make it with: hcformer fetch-weights --dir " + str(weights) in out.stderr
    )
    _, specs = scale_needs("paper", "coco_panoptic")
    assert {"timm:resnet50.tv_in1k", "timm:swin_large_patch4_window12_384.ms_in22k"} <= set(specs)
    weights.mkdir()
    for spec in specs:
        (weights / f"{spec.removeprefix('timm:')}.safetensors").write_bytes(b"")
    out = hcformer(
        "check-data", "--scale", "paper", "--dataset", "coco_panoptic", cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "coco_panoptic at datasets/coco: complete (train2017 2, val2017 2 images)" in out.stdout


def test_synthetic_scales_check_only_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    check_scale("tiny", log=lines.append)  # the tiny scale starts from random weights
    assert lines == []


def tiny_resnet_checkpoint(path: Path) -> dict:
    """The state dict of a 1-1-1-1 timm ResNet-50 (64-ch stem), saved as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model(
        "resnet50", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)
    ).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def test_fetch_weights_fills_one_folder_and_backbones_load_from_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    import torch

    from hcformer import pretrained
    from hcformer.commands import fetch_weights
    from hcformer.config import BackboneConfig
    from hcformer.models.backbones import build_backbone

    downloads = []

    def fake_hub_download(repo_id, filename, local_dir):  # huggingface_hub's signature
        downloads.append((repo_id, filename))
        path = Path(local_dir) / filename
        tiny_resnet_checkpoint(path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download)
    folder = tmp_path / "weights"
    assert fetch_weights.main(["--dir", str(folder)]) == 0
    names = sorted(pretrained.timm_weights(pretrained_weights()))
    assert sorted(r for r, _ in downloads) == [f"timm/{n}" for n in names]
    assert sorted(p.name for p in folder.iterdir()) == [f"{n}.safetensors" for n in names]
    capsys.readouterr()
    assert fetch_weights.main(["--dir", str(folder)]) == 0  # a second run downloads nothing
    assert len(downloads) == len(names) and "nothing to do" in capsys.readouterr().out

    def offline(*args, **kwargs):
        raise AssertionError("the network was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HCFORMER_WEIGHTS", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = tiny_resnet_checkpoint(folder / "resnet50.tv_in1k.safetensors")
    cfg = BackboneConfig(
        name="resnet50",
        pretrained="timm:resnet50.tv_in1k",
        depths=[1, 1, 1, 1],
        widths=[8, 16, 32, 64],
        hierarchy_level=0,
    )
    got = build_backbone(cfg).state_dict()
    for key in ("layer1.0.conv2.weight", "layer3.0.downsample.0.weight", "layer4.0.bn3.weight"):
        match = [k for k in got if k.endswith(key)]
        assert match and torch.equal(got[match[0]], state[key]), key
