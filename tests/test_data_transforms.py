"""Training and test transforms, and batching: sizes, alignment of image and target, rng."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcformer.config import DataConfig
from hcformer.data import collate, train_transform
from hcformer.data import transforms as T
from hcformer.data.base import Record
from hcformer.data.transforms import max_train_size, scale_choices, shortest_edge_size


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
    assert max_train_size(DataConfig(crop=[512, 512])) == 2048
    assert max_train_size(DataConfig(crop=[640, 640])) == 2560
    assert max_train_size(DataConfig(crop=[512, 1024], scale_base=1024)) == 4096
    assert max_train_size(DataConfig(crop=[512, 1024], train_max_size=3000)) == 3000


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
    batch = collate([a, b], size_divisibility=32, pad_value=128)
    # A whole-number fill keeps the batch uint8 (converted to float on the device); the mean
    # (test batches) makes it float32.
    assert batch["images"].shape == (2, 3, 64, 96) and batch["images"].dtype == torch.uint8
    assert collate([a, b], pad_value=(123.675, 116.28, 103.53))["images"].dtype == torch.float32
    assert torch.equal(batch["images"][1, :, :48, :64], b["image"])
    assert (batch["images"][1, :, 48:, :] == 128).all() and (
        batch["images"][1, :, :, 64:] == 128
    ).all()
    t = batch["targets"][1]
    assert t["sem_seg"].shape == (64, 96) and (t["sem_seg"][48:] == 255).all()
    assert (
        t["instances"]["masks"].shape[1:] == (64, 96) and not t["instances"]["masks"][:, 48:].any()
    )
    assert batch["metas"][0]["size"] == (64, 96)
    odd = collate(
        [train_transform(coded_record(33, 33, "panoptic"), LSJ, np.random.default_rng(0))],
        pad_value=0,
    )
    assert odd["images"].shape[-2:] == (96, 96)
    assert collate(
        [
            T.test_transform(
                coded_record(33, 70, "semantic"), DataConfig(test_short=33, test_max=999)
            )
        ],
        pad_value=0,
    )["images"].shape[-2:] == (64, 96)
    with pytest.raises(ValueError, match="pad_value: expected one number or three"):
        collate([a], pad_value=(1.0, 2.0))


def test_collate_pads_to_the_fixed_training_size_in_one_pass():
    """``min_size`` (training batches): images, masks and labels reach it with their fills, the
    same as padding the divisible batch again; a batch already larger keeps its size."""
    b = train_transform(coded_record(80, 120, "semantic"), CROP, np.random.default_rng(0))
    small = collate([b], pad_value=128)  # 64x64
    big = collate([b], pad_value=128, min_size=(96, 128))
    assert small["images"].shape[-2:] == (64, 64) and big["images"].shape[-2:] == (96, 128)
    want = T.pad_images(list(small["images"]), (96, 128), 128)
    assert big["images"].dtype == torch.uint8 and torch.equal(big["images"], want)
    t, s = big["targets"][0], small["targets"][0]
    assert torch.equal(t["sem_seg"][:64, :64], s["sem_seg"]) and (t["sem_seg"][64:] == 255).all()
    assert (t["sem_seg"][:, 64:] == 255).all()
    masks = t["instances"]["masks"]
    assert masks.shape[-2:] == (96, 128) and torch.equal(
        masks[:, :64, :64], s["instances"]["masks"]
    )
    assert not masks[:, 64:].any() and not masks[:, :, 64:].any()
    assert collate([b], pad_value=128, min_size=(32, 32))["images"].shape[-2:] == (64, 64)


def normalised(images: torch.Tensor) -> torch.Tensor:
    """What the models feed their backbone: (x - mean) / std with float32 buffers."""
    from hcformer.models.hcformer import PIXEL_MEAN, PIXEL_STD

    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    return (images - mean) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def test_test_batches_pad_with_the_pixel_mean_so_the_model_sees_zero():
    from hcformer.engine.batches import eval_pad_value
    from hcformer.models.hcformer import PIXEL_MEAN

    assert eval_pad_value() == PIXEL_MEAN == (123.675, 116.28, 103.53)
    rec = coded_record(50, 70, "semantic")
    sample = T.test_transform(rec, DataConfig(test_short=50, test_max=999))  # 50x70 -> 64x96
    batch = collate([sample], size_divisibility=32, pad_value=eval_pad_value())
    x = normalised(batch["images"])[0]
    assert (x[:, 50:, :] == 0).all() and (x[:, :, 70:] == 0).all()  # exactly, not about 0
    assert torch.equal(batch["images"][0, :, :50, :70], sample["image"].float())
    assert (batch["targets"][0]["sem_seg"][50:] == 255).all()


class _Records:
    """A dataset of one record (what TrainBatches reads)."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def __len__(self) -> int:
        return 1

    def load(self, i: int) -> Record:
        return self.record


@pytest.mark.parametrize(
    ("pad", "expected"), [(128.0, (128.0, 128.0, 128.0)), ("mean", (123.675, 116.28, 103.53))]
)
def test_training_batches_pad_crops_with_the_configured_value(pad, expected):
    from hcformer.config import Config
    from hcformer.engine.batches import TrainBatches, train_pad_size

    # A 40x40 image at scale 1 stays 40x40: its crop is padded to the 64x64 training size.
    data = DataConfig(
        dataset="ade20k",
        task="semantic",
        augmentation="scale_crop",
        crop=[64, 64],
        scale_base=40,
        scale_range=[1.0, 1.0],
        train_image_pad=pad,
    )
    cfg = Config(data=data)
    cfg.solver.batch_size = 2
    batches = TrainBatches(_Records(coded_record(40, 40, "semantic")), cfg, seed=0, passes=[[0, 1]])
    images, targets = batches.load(0, [0, 1])
    assert train_pad_size(cfg) == (64, 64) and images.shape == (2, 3, 64, 64)
    assert images.dtype == (torch.uint8 if pad == 128.0 else torch.float32)
    images = images.float()  # as to_device hands them to the model
    fill = torch.tensor(expected, dtype=torch.float32).view(3, 1, 1)
    for b in range(2):
        assert torch.equal(images[b, :, 40:, :], fill.expand(3, 24, 64))
        assert torch.equal(images[b, :, :40, 40:], fill.expand(3, 40, 24))
        assert (targets[b]["sem_seg"][40:] == 255).all() and (
            targets[b]["sem_seg"][:, 40:] == 255
        ).all()
        assert not targets[b]["masks"][:, 40:].any() and not targets[b]["masks"][:, :, 40:].any()
        assert (images[b, :, :40, :40] != fill).any()  # the content is the image
    if pad == "mean":
        assert (normalised(images)[:, :, 40:] == 0).all()


def test_lsj_batches_keep_the_128_canvas():
    from hcformer.config import Config
    from hcformer.engine.batches import TrainBatches

    cfg = Config(data=LSJ)  # the transform pads to the 96 canvas with 128 (FixedSizeCrop)
    cfg.solver.batch_size = 1
    rec = coded_record(60, 90, "panoptic")
    batches = TrainBatches(_Records(rec), cfg, seed=3, passes=[[0]])
    sample = batches.sample(0, 0)
    images, _ = batches.load(0, [0])
    h, w = sample["meta"]["size"]
    assert images.shape == (1, 3, 96, 96) and torch.equal(images[0], sample["image"].float())
    assert (images[0, :, h:] == 128).all() and (images[0, :, :, w:] == 128).all()


# --------------------------------------------------------------------------------------
# SSD colour jitter (detectron2's ColorAugSSDTransform), against colorsys.


def _bgr(rgb: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(rgb, dtype=np.uint8)[None, :, ::-1].copy()


def _colorsys(bgr: np.ndarray, hue_degrees: float = 0.0, saturation: float = 1.0) -> np.ndarray:
    """The reference: Python's colorsys HSV on 0..1 floats, hue in turns, S clipped at 1."""
    import colorsys

    out = []
    for b, g, r in bgr.reshape(-1, 3) / 255.0:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        r, g, b = colorsys.hsv_to_rgb((h + hue_degrees / 360) % 1.0, min(s * saturation, 1.0), v)
        out.append([b * 255, g * 255, r * 255])
    return np.array(out).reshape(bgr.shape)


RANDOM_BGR = np.random.default_rng(7).integers(0, 256, (1, 300, 3)).astype(np.uint8)


@pytest.mark.parametrize("delta", [-18, -7, 1, 18])
def test_hue_shift_is_opencvs_180_unit_hue(delta):
    got = T.shift_hue(RANDOM_BGR, delta).astype(float)
    err = np.abs(got - _colorsys(RANDOM_BGR, hue_degrees=2 * delta))
    # uint8 HSV holds hue in 2-degree steps and S, V in 1/255: a few levels off at most
    assert err.max() <= 6 and err.mean() < 1.0
    # Pure colours land exactly: red + 30 units (60 degrees) is yellow; wrapping past 180.
    red_yellow = _bgr([(255, 0, 0), (255, 255, 0), (0, 0, 255)])
    assert T.shift_hue(red_yellow, 30)[0, :, ::-1].tolist() == [
        [255, 255, 0],
        [0, 255, 0],
        [255, 0, 255],
    ]
    assert T.shift_hue(red_yellow, -30)[0, 0, ::-1].tolist() == [255, 0, 255]  # 0 - 30 -> 150


@pytest.mark.parametrize("factor", [0.5, 0.77, 1.2, 1.5])
def test_saturation_scales_opencvs_s(factor):
    got = T.adjust_saturation(RANDOM_BGR, factor).astype(float)
    err = np.abs(got - _colorsys(RANDOM_BGR, saturation=factor))
    assert err.max() <= 6 and err.mean() < 1.0
    grey = _bgr([(90, 90, 90), (255, 255, 255)])
    assert np.array_equal(T.adjust_saturation(grey, factor), grey)  # no saturation to scale


class ScriptedRng:
    """Hands out scripted draws and checks that they are asked for in this order."""

    def __init__(self, script: list[tuple[str, float]]) -> None:
        self.script = list(script)

    def _next(self, kind: str) -> float:
        assert self.script, f"an unscripted draw: {kind}"
        want, value = self.script.pop(0)
        assert want == kind, f"drew {kind}, the script says {want}"
        return value

    def random(self) -> float:
        return self._next("random")

    def uniform(self, lo: float, hi: float) -> float:
        value = self._next("uniform")
        assert lo <= value <= hi
        return value

    def integers(self, lo: int, hi: int) -> int:
        value = self._next("integers")
        assert lo <= value < hi
        return int(value)


YES, NO = 0.25, 0.75  # rng.random() < 0.5 applies a step


def test_colour_jitter_brightness_and_contrast_clip_and_truncate():
    image = np.array([[[100, 250, 3], [10, 200, 255]]], dtype=np.uint8)
    # brightness +10.9, contrast first: x 0.5; saturation, hue skipped
    rng = ScriptedRng(
        [("random", YES), ("uniform", 10.9), ("random", YES), ("random", YES), ("uniform", 0.5)]
        + [("random", NO), ("random", NO)]
    )
    out = T.color_jitter(image, rng)
    assert not rng.script
    # 100 + 10.9 = 110.9 -> 110 (truncated, not rounded), 250 -> 255, then halves truncated
    assert out.tolist() == [[[55, 127, 6], [10, 105, 127]]]
    assert out.dtype == np.uint8 and image[0, 0].tolist() == [100, 250, 3]  # input untouched


def test_colour_jitter_order_of_steps_and_draws():
    image = np.random.default_rng(1).integers(0, 256, (8, 9, 3)).astype(np.uint8)  # RGB
    bgr = image[:, :, ::-1]

    def rgb(x: np.ndarray) -> list:
        return x[:, :, ::-1].tolist()

    brightness = np.clip(bgr.astype(np.float32) - 20.0, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.clip(x.astype(np.float32) * 1.4, 0, 255).astype(np.uint8)

    # no brightness; order coin says saturation, hue, contrast; all three applied
    rng = ScriptedRng(
        [("random", NO), ("random", NO), ("random", YES), ("uniform", 1.3)]
        + [("random", YES), ("integers", -12), ("random", YES), ("uniform", 1.4)]
    )
    late = contrast(T.shift_hue(T.adjust_saturation(bgr.copy(), 1.3), -12))
    assert T.color_jitter(image, rng).tolist() == rgb(late) and not rng.script
    # brightness -20, then contrast, saturation, hue
    rng = ScriptedRng(
        [("random", YES), ("uniform", -20.0), ("random", YES), ("random", YES), ("uniform", 1.4)]
        + [("random", YES), ("uniform", 1.3), ("random", YES), ("integers", -12)]
    )
    early = T.shift_hue(T.adjust_saturation(contrast(brightness), 1.3), -12)
    assert T.color_jitter(image, rng).tolist() == rgb(early) and not rng.script
    assert rgb(early) != rgb(late)  # the order matters on this image
    # the RGB input is converted to BGR and back: a hue step on pure red gives yellow
    rng = ScriptedRng([("random", NO), ("random", YES), ("random", NO), ("random", NO)])
    rng.script += [("random", YES), ("integers", 18)]
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    assert T.color_jitter(red, rng).tolist() == [[[255, 153, 0]]] and not rng.script  # 36 deg


def test_colour_jitter_is_a_function_of_the_rng_state():
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    runs = [T.color_jitter(image, np.random.default_rng(seed)) for seed in (5, 5, 6)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
