"""Training and test transforms (App. D of the paper, as the authors' Mask2Former-based code).

- ``augmentation: lsj`` (COCO): horizontal flip, large-scale jitter (ResizeScale: the image is
  scaled to fit ``s * lsj_size`` square, ``s ~ U(scale_range)``), a random crop to at most
  ``lsj_size x lsj_size``, padded to exactly that size (image 128, as detectron2's FixedSizeCrop;
  labels: ignore / VOID / no mask).
- ``augmentation: scale_crop`` (ADE20K, Cityscapes): the short side is drawn from
  ``int(x * 0.1 * scale_base)`` for x in ``scale_range * 10`` (detectron2's "choice" list:
  256..1024 for ADE20K, 320..1280 for its 640 crops, 512..2048 for Cityscapes), the long side
  capped at ``train_max_size``; a random crop of at most ``crop``; horizontal flip; SSD colour
  augmentation when ``color_jitter`` (:func:`color_jitter`).
- Test: resize so the short side is ``test_short`` and the long side at most ``test_max``.

Images are resized bilinearly (PIL, as detectron2); label maps, panoptic id maps and instance
masks by nearest neighbour with one shared index map, so they stay aligned. Instance masks are
resized as bitmaps (detectron2 re-rasterises polygons; the difference is sub-pixel). Padding
to the crop and to a multiple of 32 happens when batching (:func:`collate`, with the value the
engine gives: ``data.train_image_pad`` for training crops, the pixel mean for test images).
Every random draw comes from the ``rng`` argument, so the same generator state gives the same
sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from hcformer.config import DataConfig
from hcformer.data.base import IGNORE_LABEL, Record

LSJ_IMAGE_PAD = 128  # detectron2 FixedSizeCrop's pad value


# --------------------------------------------------------------------------------------
# Geometric operations on a dict of aligned arrays.


class _Views:
    """The image and its aligned label arrays (any of sem_seg, pan_seg, masks)."""

    def __init__(self, record: Record) -> None:
        self.image = record.image
        t = record.target
        self.sem_seg = t.get("sem_seg")
        self.pan_seg = t.get("pan_seg")
        self.masks = t.get("masks")  # bool [N, H, W]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def resize(self, h: int, w: int) -> None:
        if (h, w) == self.size:
            return
        H, W = self.size
        self.image = np.array(Image.fromarray(self.image).resize((w, h), Image.BILINEAR))
        rows, cols = _nearest_index(H, h), _nearest_index(W, w)
        if self.sem_seg is not None:
            self.sem_seg = self.sem_seg[rows][:, cols]
        if self.pan_seg is not None:
            self.pan_seg = self.pan_seg[rows][:, cols]
        if self.masks is not None:
            self.masks = self.masks[:, rows][:, :, cols]

    def crop(self, y0: int, x0: int, h: int, w: int) -> None:
        sl = (slice(y0, y0 + h), slice(x0, x0 + w))
        self.image = self.image[sl]
        if self.sem_seg is not None:
            self.sem_seg = self.sem_seg[sl]
        if self.pan_seg is not None:
            self.pan_seg = self.pan_seg[sl]
        if self.masks is not None:
            self.masks = self.masks[(slice(None), *sl)]

    def flip(self) -> None:
        self.image = self.image[:, ::-1]
        if self.sem_seg is not None:
            self.sem_seg = self.sem_seg[:, ::-1]
        if self.pan_seg is not None:
            self.pan_seg = self.pan_seg[:, ::-1]
        if self.masks is not None:
            self.masks = self.masks[:, :, ::-1]

    def pad_to(self, h: int, w: int, image_value: int) -> None:
        H, W = self.size
        ph, pw = max(h - H, 0), max(w - W, 0)
        if not (ph or pw):
            return
        self.image = np.pad(self.image, ((0, ph), (0, pw), (0, 0)), constant_values=image_value)
        if self.sem_seg is not None:
            self.sem_seg = np.pad(self.sem_seg, ((0, ph), (0, pw)), constant_values=IGNORE_LABEL)
        if self.pan_seg is not None:
            self.pan_seg = np.pad(self.pan_seg, ((0, ph), (0, pw)), constant_values=0)
        if self.masks is not None:
            self.masks = np.pad(self.masks, ((0, 0), (0, ph), (0, pw)), constant_values=False)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-neighbour resize (pixel centres)."""
    idx = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _random_crop(v: _Views, crop_h: int, crop_w: int, rng: np.random.Generator) -> None:
    H, W = v.size
    ch, cw = min(crop_h, H), min(crop_w, W)
    y0 = int(rng.integers(0, H - ch + 1))
    x0 = int(rng.integers(0, W - cw + 1))
    v.crop(y0, x0, ch, cw)


def _lsj(v: _Views, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < 0.5:
        v.flip()
    lo, hi = cfg.scale_range
    s = rng.uniform(lo, hi)
    H, W = v.size
    factor = min(s * cfg.lsj_size / H, s * cfg.lsj_size / W)
    v.resize(max(1, round(H * factor)), max(1, round(W * factor)))
    # FixedSizeCrop: a random offset into the part that exceeds the crop, then pad.
    H, W = v.size
    ch, cw = min(cfg.lsj_size, H), min(cfg.lsj_size, W)
    u = rng.uniform(0.0, 1.0)  # one draw for both axes, as detectron2
    y0, x0 = int(round((H - ch) * u)), int(round((W - cw) * u))
    v.crop(y0, x0, ch, cw)
    v.pad_to(cfg.lsj_size, cfg.lsj_size, LSJ_IMAGE_PAD)
    return ch, cw


def scale_choices(cfg: DataConfig) -> list[int]:
    """``scale_crop``: the short sides drawn from, ``int(x * 0.1 * scale_base)`` for x in
    ``scale_range * 10`` (``scale_base`` None: the crop's short side)."""
    base = cfg.scale_base or min(cfg.crop)
    lo, hi = (round(x * 10) for x in cfg.scale_range)
    return [int(x * 0.1 * base) for x in range(lo, hi + 1)]


def max_train_size(cfg: DataConfig) -> int:
    """``scale_crop``: the cap on the long side (``train_max_size``, else 4 x the scale base)."""
    return cfg.train_max_size or 4 * (cfg.scale_base or min(cfg.crop))


def _scale_crop(v: _Views, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int]:
    choices = scale_choices(cfg)
    short = choices[int(rng.integers(len(choices)))]
    H, W = v.size
    v.resize(*shortest_edge_size(H, W, short, max_train_size(cfg)))
    _random_crop(v, cfg.crop[0], cfg.crop[1], rng)
    if rng.random() < 0.5:
        v.flip()
    return v.size


# SSD photometric distortion: brightness delta, contrast and saturation factors, hue delta (in
# OpenCV's uint8 hue units of 2 degrees), as detectron2's ColorAugSSDTransform defaults.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``x * alpha + beta`` in float32, clipped to 0..255 and truncated back to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def adjust_saturation(bgr: np.ndarray, factor: float) -> np.ndarray:
    """Scale S of OpenCV's uint8 HSV (clipped, truncated); BGR uint8 in and out."""
    import cv2  # here: only the colour augmentation needs OpenCV; a machine without it trains

    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = _affine(hsv[:, :, 1], alpha=factor)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def shift_hue(bgr: np.ndarray, delta: int) -> np.ndarray:
    """Add ``delta`` to H of OpenCV's uint8 HSV (H in 0..179) modulo 180; BGR uint8 in and out."""
    import cv2  # here: only the colour augmentation needs OpenCV; a machine without it trains

    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + delta) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD colour augmentation as detectron2's ``ColorAugSSDTransform`` (Mask2Former's semantic
    mapper), on an RGB uint8 ``[H, W, 3]`` image; a new array is returned.

    On the BGR image: with probability 1/2 add ``U(-32, 32)``; then, in an order drawn with
    probability 1/2 each, either contrast, saturation, hue or saturation, hue, contrast, each
    applied with probability 1/2: contrast multiplies by ``U(0.5, 1.5)``, saturation multiplies
    S of OpenCV's uint8 HSV by ``U(0.5, 1.5)``, hue adds an integer of -18..18 to H modulo 180.
    Every step clips to 0..255 and truncates to uint8. Draws, in order: the step's coin, then
    its value (``rng.random() < 0.5``, ``rng.uniform``, ``rng.integers``).
    """
    img = np.ascontiguousarray(image[:, :, ::-1])  # BGR, as the authors' transform works in

    def contrast(x: np.ndarray) -> np.ndarray:
        return _affine(x, alpha=rng.uniform(*CONTRAST_RANGE)) if rng.random() < 0.5 else x

    def saturation(x: np.ndarray) -> np.ndarray:
        return adjust_saturation(x, rng.uniform(*SATURATION_RANGE)) if rng.random() < 0.5 else x

    def hue(x: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            return shift_hue(x, int(rng.integers(-HUE_DELTA, HUE_DELTA + 1)))
        return x

    if rng.random() < 0.5:
        img = _affine(img, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    steps = (contrast, saturation, hue) if rng.random() < 0.5 else (saturation, hue, contrast)
    for step in steps:
        img = step(img)
    return np.ascontiguousarray(img[:, :, ::-1])


# --------------------------------------------------------------------------------------
# Records -> samples.


def _instances(v: _Views, record: Record) -> dict[str, torch.Tensor]:
    t = record.target
    if v.pan_seg is not None:  # panoptic: the non-crowd segments still visible
        segs = [s for s in t["segments"] if not s["iscrowd"]]
        ids = np.array([s["id"] for s in segs], dtype=np.int64)
        masks = v.pan_seg[None] == ids[:, None, None] if len(ids) else _no_masks(v)
        labels = np.array([s["label"] for s in segs], dtype=np.int64)
    elif v.masks is not None:  # instance: the non-crowd things still visible
        keep = ~np.asarray(t["iscrowd"], dtype=bool)
        masks, labels = v.masks[keep], np.asarray(t["labels"], dtype=np.int64)[keep]
    else:  # semantic: one mask per class present (MaskFormer's semantic mapper)
        labels = np.unique(v.sem_seg)
        labels = labels[labels != IGNORE_LABEL].astype(np.int64)
        masks = v.sem_seg[None] == labels[:, None, None]
    nonempty = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
    return {
        "labels": torch.from_numpy(labels[nonempty].astype(np.int64)),
        "masks": torch.from_numpy(np.ascontiguousarray(masks[nonempty])),
    }


def _no_masks(v: _Views) -> np.ndarray:
    return np.zeros((0, *v.size), dtype=bool)


def _to_sample(v: _Views, record: Record) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "image": torch.from_numpy(np.array(v.image, dtype=np.uint8)).permute(2, 0, 1).contiguous(),
        "instances": _instances(v, record),
        "meta": {
            "image_id": record.image_id,
            "file_name": record.file_name,
            "stem": record.stem,
            "orig_size": record.size,
        },
    }
    if v.sem_seg is not None:
        sample["sem_seg"] = torch.from_numpy(np.ascontiguousarray(v.sem_seg).astype(np.int64))
    return sample


def train_transform(record: Record, cfg: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A training sample: augmentation as ``cfg.augmentation`` (see the module docstring).

    ``meta["size"]`` is the size of the image content before the LSJ padding.
    """
    v = _Views(record)
    size = _lsj(v, cfg, rng) if cfg.augmentation == "lsj" else _scale_crop(v, cfg, rng)
    if cfg.color_jitter:
        v.image = color_jitter(v.image, rng)
    sample = _to_sample(v, record)
    sample["meta"]["size"] = size
    return sample


def test_transform(record: Record, cfg: DataConfig) -> dict[str, Any]:
    """A test sample: resized to short side ``test_short``, long side at most ``test_max``.

    ``meta["orig_size"]`` and ``meta["size"]`` (resized, before padding) map predictions back:
    crop the padded prediction to ``size``, then resize it to ``orig_size``.
    """
    v = _Views(record)
    H, W = v.size
    v.resize(*shortest_edge_size(H, W, cfg.test_short, cfg.test_max))
    sample = _to_sample(v, record)
    sample["meta"]["size"] = v.size
    return sample


def collate(
    samples: list[dict[str, Any]],
    size_divisibility: int = 32,
    *,
    pad_value: float | Sequence[float],
    min_size: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Pad a list of samples to one size divisible by ``size_divisibility``, and at least
    ``min_size`` (the fixed size of training batches), in one pass.

    Returns ``{"images": [B, 3, H, W] (0..255; uint8 or float32 as :func:`pad_images` says),
    "targets": [...], "metas": [...]}``: images padded with ``pad_value`` (one number, or one
    per RGB channel: the model's pixel mean pads with what normalises to 0), each target a dict with ``instances`` (``labels`` int64
    [N], ``masks`` bool [N, H, W] padded with False) and, when the sample has it, ``sem_seg``
    (int64 [H, W] padded with 255). Metas are the samples' ``meta`` dicts unchanged.
    """
    if not samples:
        raise ValueError("collate: no samples")
    d = max(1, size_divisibility)
    H = max(s["image"].shape[1] for s in samples)
    W = max(s["image"].shape[2] for s in samples)
    H, W = max(-(-H // d) * d, min_size[0]), max(-(-W // d) * d, min_size[1])
    images = pad_images([s["image"] for s in samples], (H, W), pad_value)
    targets = []
    for s in samples:
        masks = s["instances"]["masks"]
        padded = torch.zeros((masks.shape[0], H, W), dtype=torch.bool)
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        target: dict[str, Any] = {
            "instances": {"labels": s["instances"]["labels"], "masks": padded}
        }
        if "sem_seg" in s:
            sem = torch.full((H, W), IGNORE_LABEL, dtype=torch.int64)
            sem[: s["sem_seg"].shape[0], : s["sem_seg"].shape[1]] = s["sem_seg"]
            target["sem_seg"] = sem
        targets.append(target)
    return {"images": images, "targets": targets, "metas": [s["meta"] for s in samples]}


def pad_images(
    images: Sequence[torch.Tensor], size: tuple[int, int], pad_value: float | Sequence[float]
) -> torch.Tensor:
    """``[3, h, w]`` images (0..255) at the top left of a ``[B, 3, *size]`` batch filled with
    ``pad_value`` (a number or one per channel).

    The batch stays uint8 when the images are uint8 and the fill is a whole number in 0..255
    (training crops padded with 128): a quarter of float32's bytes through the data workers and
    the host-to-device copy, converted to float on the device. Otherwise (the pixel mean) it is
    float32."""
    fill = torch.as_tensor(pad_value, dtype=torch.float32).reshape(-1, 1, 1)
    if fill.shape[0] not in (1, 3):
        raise ValueError(f"pad_value: expected one number or three, got {pad_value!r}")
    exact = bool(((fill == fill.round()) & (fill >= 0) & (fill <= 255)).all())
    dtype = torch.uint8 if exact and all(i.dtype == torch.uint8 for i in images) else torch.float32
    fill = fill.to(dtype)
    out = torch.empty((len(images), 3, *size), dtype=dtype)
    for b, image in enumerate(images):  # each pixel written once: the image, else the fill
        h, w = image.shape[-2:]
        out[b, :, :h, :w] = image
        out[b, :, h:, :] = fill
        out[b, :, :h, w:] = fill
    return out
