"""mIoU (detectron2's and Cityscapes' means), pixel accuracy, and the undersegmentation error."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcformer.commands.evaluate_semantic import main
from hcformer.data.cityscapes import label_ids_to_train_ids
from hcformer.errors import DataError
from hcformer.evaluation import ConfusionMatrix, evaluate_semantic, undersegmentation_error

FIX = Path(__file__).parent / "fixtures"

GT = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 3], [2, 0, 3, 0]])


def test_miou_by_hand_detectron2_and_cityscapes():
    # Labelled pixels: class 0: 4 (3 right, 1 -> 1); class 1: 4 (3 right, 1 -> 3); class 2: 2
    # (1 right, 1 -> 0); class 3: none in the ground truth, predicted once on a labelled pixel.
    # IoU0 = 3 / (4 + 4 - 3) = 3/5 (pred 0 on labelled pixels: 3 + 1 = 4); IoU1 = 3 / (4 + 4 - 3)
    # = 3/5; IoU2 = 1 / (2 + 1 - 1) = 1/2; IoU3 = 0 / (0 + 1 - 0) = 0.
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    d2 = cm.scores("detectron2")
    assert d2["miou"] == pytest.approx(100 * (3 / 5 + 3 / 5 + 1 / 2) / 3)  # class 3 left out
    assert d2["pixel_acc"] == pytest.approx(100 * 7 / 10)
    assert d2["iou"][3] is None and d2["classes_in_mean"] == 3
    cs = cm.scores("cityscapes")
    assert cs["miou"] == pytest.approx(100 * (3 / 5 + 3 / 5 + 1 / 2 + 0) / 4)  # class 3 counts 0
    assert cs["iou"][3] == 0.0


def test_labels_outside_the_classes_are_errors():
    with pytest.raises(DataError, match=r"p.png: predicted label 4 outside the train ids 0..3"):
        ConfusionMatrix(4).update(np.array([[4]]), np.array([[0]]), where="p.png")
    with pytest.raises(DataError, match=r"is 1x2, the ground truth 1x1"):
        ConfusionMatrix(4).update(np.array([[0, 0]]), np.array([[0]]))


def _ade_layout(tmp: Path) -> Path:
    ann = tmp / "ADEChallengeData2016" / "annotations" / "validation"
    ann.mkdir(parents=True)
    for f in sorted((FIX / "ade20k_val").glob("ADE_val_*.png")):
        shutil.copy(f, ann / f.name)
    return ann


def test_real_ade20k_labels(tmp_path):
    gt_dir = _ade_layout(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    values = set()
    for f in sorted(gt_dir.glob("*.png")):
        lab = np.asarray(Image.open(f)).astype(np.int64)
        values |= set(np.unique(lab).tolist()) - {0}
        Image.fromarray(np.where(lab == 0, 0, lab - 1).astype(np.uint8)).save(pred / f.name)
    res = evaluate_semantic("ade20k", gt_dir, pred)
    assert len(res["iou"]) == 150 and res["per_class"]["wall"] == 100.0
    assert res["miou"] == 100.0 and res["classes_in_mean"] == len(values) and res["images"] == 3
    # Shift every prediction one pixel right: a real score below 100.
    for f in sorted(pred.glob("*.png")):
        p = np.asarray(Image.open(f))
        Image.fromarray(np.roll(p, 8, axis=1)).save(f)
    shifted = evaluate_semantic("ade20k", gt_dir, pred)
    assert 20 < shifted["miou"] < 100 and 50 < shifted["pixel_acc"] < 100
    (pred / "ADE_val_00000002.png").unlink()
    with pytest.raises(DataError, match=r"ADE_val_00000002.png: missing prediction"):
        evaluate_semantic("ade20k", gt_dir, pred)


def test_real_cityscapes_labels_and_official_mean(tmp_path):
    src = FIX / "cityscapes_val"
    gt_dir = tmp_path / "gtFine" / "val"
    (gt_dir / "frankfurt").mkdir(parents=True)
    shutil.copy(src / "frankfurt_000000_000294_gtFine_labelIds.png", gt_dir / "frankfurt")
    train_ids = np.asarray(Image.open(src / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    label_ids = np.asarray(Image.open(src / "frankfurt_000000_000294_gtFine_labelIds.png"))
    # The official mapping: the fixture's two PNGs were downscaled separately, so they agree
    # on all but ~0.2% of pixels; per label id, the majority train id is ours.
    mapped = label_ids_to_train_ids(label_ids)
    assert (mapped == train_ids).mean() > 0.995
    for label_id in np.unique(label_ids):
        vals, counts = np.unique(train_ids[label_ids == label_id], return_counts=True)
        assert mapped[label_ids == label_id][0] == vals[counts.argmax()], label_id
    train_ids = mapped
    pred = tmp_path / "pred"
    pred.mkdir()
    p = np.where(train_ids == 255, 18, train_ids).astype(np.uint8)  # bicycle on ignored pixels
    Image.fromarray(p).save(pred / "frankfurt_000000_000294.png")
    res = evaluate_semantic("cityscapes", gt_dir, pred)
    assert res["miou"] == 100.0 and len(res["iou"]) == 19 and res["mean"] == "cityscapes"
    p2 = p.copy()
    p2[train_ids == 0] = 18  # road predicted as bicycle, which the ground truth lacks
    Image.fromarray(p2).save(pred / "frankfurt_000000_000294.png")
    res = evaluate_semantic("cityscapes", gt_dir, pred)
    present = len(set(np.unique(train_ids).tolist()) - {255})
    assert res["iou"][0] == 0.0 and res["iou"][18] == 0.0
    assert res["miou"] == pytest.approx(100 * (present - 1) / (present + 1))  # bicycle counts


def test_cli(tmp_path):
    gt_dir = _ade_layout(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in gt_dir.glob("*.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(f)))).save(pred / f.name)
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "--dataset",
                "ade20k",
                "--gt-dir",
                str(gt_dir),
                "--pred-dir",
                str(pred),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert 0 < res["miou"] < 100 and res["per_class"]["wall"] > 0


def ue_brute_force(labels: np.ndarray, gt: np.ndarray, ignore: int = 255) -> float:
    """Neubert & Protzel's corrected UE, straight from the definition (loops)."""
    keep = gt != ignore
    n = keep.sum()
    total = 0
    for g in set(gt[keep].tolist()):
        seg = (gt == g) & keep
        for s in set(labels[seg].tolist()):
            cluster = (labels == s) & keep
            inside = (cluster & seg).sum()
            total += min(inside, cluster.sum() - inside)
    return 100 * total / n


def test_undersegmentation_error_by_hand_and_brute_force():
    gt = np.array([[0, 0, 1, 1]] * 4)
    assert undersegmentation_error(np.array([[0, 0, 1, 1]] * 4), gt) == 0.0
    # One cluster of 12 straddles: 8 px on gt 0, 4 on gt 1 -> min(8, 4) + min(4, 8) = 8 of 16.
    clusters = np.array([[0, 0, 0, 1]] * 4)
    assert undersegmentation_error(clusters, gt) == pytest.approx(100 * 8 / 16)
    # Ignored pixels are left out of N and of the clusters.
    gt_ign = gt.copy()
    gt_ign[:, 2] = 255
    assert undersegmentation_error(clusters, gt_ign) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.integers(0, 4, size=(12, 10))
        g[rng.random(g.shape) < 0.1] = 255
        c = rng.integers(0, 7, size=(12, 10))
        assert undersegmentation_error(c, g) == pytest.approx(ue_brute_force(c, g))


def test_undersegmentation_error_upsamples_nearest():
    gt = np.kron(np.array([[0, 1], [1, 2]]), np.ones((4, 4), int))
    coarse = np.array([[5, 6], [6, 7]])
    assert undersegmentation_error(coarse, gt) == 0.0  # 2x2 clusters, each 4x4 px at full size
    coarse = np.array([[5, 5], [6, 7]])
    assert undersegmentation_error(coarse, gt) == pytest.approx(100 * 32 / 64)
    for a, b in itertools.product(range(2), range(2)):
        assert undersegmentation_error(np.full((1, 1), 3), np.full((4, 4), a + b)) == 0.0
