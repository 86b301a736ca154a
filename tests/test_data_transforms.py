"""Training and test transforms, and batching: sizes, alignment of image and target, rng."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcformer.config import DataConfig
from hcformer.data import collate, train_transform
from hcformer.data import transforms as T
from hcformer.data.base import Record
from hcformer.data.transforms import scale_choices, shortest_edge_size


def coded_record(h: int, w: int, task: str) -> Record:
    """An image whose pixels encode their own label, so any misalignment shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    sem = ((yy // 10) * 7 + (xx // 10)) % 9  # labels 0..8 in 10x10 blocks
    sem[:5, :5] = 255
    image = np.stack([sem * 20, sem * 20, np.full_like(sem, 50)], -1).astype(np.uint8)
    image[sem == 255] = 250
    if task == "semantic":
        target = {"sem_seg": sem.astype(np.uint8)}
    elif task == "panoptic":
        pan = np.where(sem == 255, 0, sem + 1).astype(np.int32) * 1000
        segs = [
            {
                "id": (k + 1) * 1000,
                "category_id": k + 1,
                "label": k,
                "isthing": k < 4,
                "iscrowd": k == 8,
                "area": 0,
            }
            for k in range(9)
        ]
        target = {"pan_seg": pan, "segments": segs}
    else:
        labels = np.arange(9)
        target = {
            "masks": sem[None] == labels[:, None, None],
            "labels": labels,
            "iscrowd": labels == 8,
        }
    return Record(image=image, target=target, image_id=1, file_name="x.jpg", stem="x")


def decode(sample: dict) -> torch.Tensor:
    """The label each pixel's colour says it has (255 = ignore; bilinear resizing blends edges)."""
    v = sample["image"][0].double()
    return torch.where(v > 225, 255, torch.round(v / 20)).long()


def agreement(sample: dict, mask: torch.Tensor, label: int | torch.Tensor) -> float:
    """Fraction of a target region whose pixels' colour gives its label (~1 when aligned)."""
    return (decode(sample)[mask] == label).double().mean().item()


LSJ = DataConfig(
    dataset="coco_panoptic",
    task="panoptic",
    augmentation="lsj",
    lsj_size=96,
    scale_range=[0.1, 2.0],
)
CROP = DataConfig(
    dataset="ade20k",
    task="semantic",
    augmentation="scale_crop",
    crop=[48, 64],
    scale_base=64,
    scale_range=[0.5, 2.0],
    test_short=64,
    test_max=100,
)


@pytest.mark.parametrize("seed", range(6))
def test_lsj_output_is_the_fixed_square(seed):
    rec = coded_record(60, 90, "panoptic")
    s = train_transform(rec, LSJ, np.random.default_rng(seed))
    assert s["image"].shape == (3, 96, 96) and s["image"].dtype == torch.uint8
    h, w = s["meta"]["size"]
    assert 1 <= h <= 96 and 1 <= w <= 96
    assert (s["image"][:, h:, :] == 128).all() and (s["image"][:, :, w:] == 128).all()
    masks, labels = s["instances"]["masks"], s["instances"]["labels"]
    assert masks.shape[1:] == (96, 96) and not masks[:, h:].any() and not masks[:, :, w:].any()
    assert 8 not in labels.tolist()  # the crowd segment is not a target
    for m, lab in zip(masks, labels):  # every mask is where its colour says
        assert m.any() and agreement(s, m, lab) > 0.7


def test_lsj_scale_follows_the_range():
    rec = coded_record(64, 64, "panoptic")
    sizes = [train_transform(rec, LSJ, np.random.default_rng(i))["meta"]["size"] for i in range(40)]
    # scale s in [0.1, 2.0] of the 96 target: content 10..96 px (cropped at 96 above s = 1).
    assert min(min(s) for s in sizes) < 30 and max(max(s) for s in sizes) == 96


@pytest.mark.parametrize("seed", range(6))
def test_scale_crop_size_flip_and_alignment(seed):
    rec = coded_record(80, 120, "semantic")
    s = train_transform(rec, CROP, np.random.default_rng(seed))
    _, h, w = s["image"].shape
    assert (h, w) == tuple(s["meta"]["size"])
    # short side 32..128 (0.5-2.0 x 64), then a crop of at most 48x64
    assert h <= 48 and w <= 64
    sem = s["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (h, w)
    labelled = sem != 255
    for lab in sem[labelled].unique():
        assert agreement(s, sem == lab, lab) > 0.7
    if (~labelled).any():
        assert agreement(s, ~labelled, 255) > 0.5
    # semantic targets: one mask per class present (MaskFormer)
    labels = s["instances"]["labels"]
    assert labels.tolist() == sorted(set(sem[labelled].tolist()))
    assert torch.equal(s["instances"]["masks"].sum(0).bool(), labelled)


def test_scale_crop_reaches_the_crop_size():
    rec = coded_record(80, 120, "semantic")
    sizes = {
        tuple(train_transform(rec, CROP, np.random.default_rng(i))["image"].shape[1:])
        for i in range(30)
    }
    assert (48, 64) in sizes and any(h < 48 for h, _ in sizes)


def test_scale_choices_are_detectron2s():
    ade = scale_choices(DataConfig(crop=[512, 512], scale_range=[0.5, 2.0]))
    assert ade == [int(x * 0.1 * 512) for x in range(5, 21)] and ade[0] == 256 and ade[-1] == 1024
    city = scale_choices(DataConfig(crop=[512, 1024], scale_base=1024, scale_range=[0.5, 2.0]))
    assert city[0] == 512 and city[-1] == 2048 and len(city) == 16


def test_flip_happens_and_keeps_alignment():
    rec = coded_record(40, 40, "semantic")
    cfg = DataConfig(
        augmentation="scale_crop", crop=[40, 40], scale_base=40, scale_range=[1.0, 1.0]
    )
    flips = 0
    for i in range(20):
        s = train_transform(rec, cfg, np.random.default_rng(i))
        flipped = torch.equal(
            s["sem_seg"], torch.from_numpy(rec.target["sem_seg"][:, ::-1].astype(np.int64))
        )
        same = torch.equal(s["sem_seg"], torch.from_numpy(rec.target["sem_seg"].astype(np.int64)))
        assert flipped or same
        flips += flipped
        labelled = s["sem_seg"] != 255
        assert (decode(s)[labelled] == s["sem_seg"][labelled]).all()  # scale 1: no blending
    assert 3 <= flips <= 17


def test_same_rng_same_sample_and_colour_jitter():
    rec = coded_record(70, 50, "instance")
    cfg = DataConfig(
        dataset="coco_instance", task="instance", augmentation="lsj", lsj_size=64, color_jitter=True
    )
    a = train_transform(rec, cfg, np.random.default_rng([1, 2, 3]))
    b = train_transform(rec, cfg, np.random.default_rng([1, 2, 3]))
    c = train_transform(rec, cfg, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a["image"], b["image"]) and torch.equal(
        a["instances"]["masks"], b["instances"]["masks"]
    )
    assert not torch.equal(a["image"], c["image"])
    assert 8 not in a["instances"]["labels"].tolist()  # crowd left out


def test_test_transform_resizes_short_side_with_a_cap():
    assert shortest_edge_size(427, 640, 800, 1333) == (800, 1199)
    assert shortest_edge_size(1024, 2048, 1024, 2048) == (1024, 2048)
    assert shortest_edge_size(100, 400, 64, 100) == (25, 100)
    rec = coded_record(80, 120, "semantic")
    s = T.test_transform(rec, CROP)
    assert s["image"].shape == (3, 64, 96) and s["meta"]["size"] == (64, 96)
    assert s["meta"]["orig_size"] == (80, 120) and s["meta"]["stem"] == "x"
    assert s["sem_seg"].shape == (64, 96)


def test_collate_pads_to_multiples_of_32():
    rec = coded_record(80, 120, "semantic")
    a = T.test_transform(rec, CROP)  # 64x96
    b = train_transform(rec, CROP, np.random.default_rng(0))  # 48x64
    batch = collate([a, b], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 64, 96) and batch["images"].dtype == torch.uint8
    assert (batch["images"][1, :, 48:, :] == 0).all() and (batch["images"][1, :, :, 64:] == 0).all()
    t = batch["targets"][1]
    assert t["sem_seg"].shape == (64, 96) and (t["sem_seg"][48:] == 255).all()
    assert (
        t["instances"]["masks"].shape[1:] == (64, 96) and not t["instances"]["masks"][:, 48:].any()
    )
    assert batch["metas"][0]["size"] == (64, 96)
    odd = collate(
        [train_transform(coded_record(33, 33, "panoptic"), LSJ, np.random.default_rng(0))]
    )
    assert odd["images"].shape[-2:] == (96, 96)
    assert collate(
        [
            T.test_transform(
                coded_record(33, 70, "semantic"), DataConfig(test_short=33, test_max=999)
            )
        ]
    )["images"].shape[-2:] == (64, 96)
