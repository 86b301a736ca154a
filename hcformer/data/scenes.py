"""Synthetic scenes for the ``tiny`` and ``smoke`` scales (docs/tiny-scale.md).

A scene has 2-3 *stuff* regions with irregular boundaries (the argmax of random smooth
fields) and 2-5 *things* (disc, square, triangle, ring; 12+ px across at 128x128), some
touching or overlapping, sometimes a *crowd* region (a cluster of small shapes of one thing
class) and a small *VOID* patch of unlabelled clutter.

Each of the 8 classes has a mean colour (jittered +-12% per region), a texture and, for
things, a shape. Two pairs share their colour distribution and differ only in texture (the
stuff pair) or in shape and texture (the thing pair), so colour alone cannot solve the task:
half of the classes are in a pair (tests/test_synthetic.py trains a per-pixel RGB classifier
and checks it confuses each pair). :mod:`hcformer.data.synthetic` writes scenes in the real
dataset formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SynthClass:
    name: str
    isthing: bool
    color: tuple[int, int, int]
    texture: str
    shape: str = ""


CLASSES: tuple[SynthClass, ...] = (
    SynthClass("meadow", False, (96, 140, 80), "smooth"),
    SynthClass("field", False, (96, 140, 80), "stripes"),  # pair: meadow (texture only)
    SynthClass("wall", False, (150, 105, 70), "checker"),
    SynthClass("sky", False, (110, 150, 205), "smooth"),
    SynthClass("disc", True, (205, 70, 70), "smooth", "disc"),
    SynthClass(
        "tile", True, (205, 70, 70), "fine_checker", "square"
    ),  # pair: disc (shape, texture)
    SynthClass("pennant", True, (225, 200, 80), "stripes", "triangle"),
    SynthClass("ring", True, (90, 80, 175), "smooth", "ring"),
)
PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (4, 5))
STUFF = [i for i, c in enumerate(CLASSES) if not c.isthing]
THINGS = [i for i, c in enumerate(CLASSES) if c.isthing]

TEXTURE_AMPLITUDE = 32.0
NOISE_STD = 6.0


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    classes: np.ndarray  # int16 [H, W]: class index, -1 = VOID
    instances: np.ndarray  # int32 [H, W]: 0 = none, k = things[k - 1]
    things: list[tuple[int, bool]]  # (class index, iscrowd) per instance


def _texture(name: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean luminance pattern in [-1, 1] of period 5-11 px (none for "smooth")."""
    if name == "smooth":
        return np.zeros_like(yy)
    if name == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 9)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        return np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if name == "checker":
        p = rng.uniform(8, 11)
        a = np.sin(2 * np.pi * xx / p + rng.uniform(0, 6.3))
        b = np.sin(2 * np.pi * yy / p + rng.uniform(0, 6.3))
        return np.sign(a * b)
    if name == "fine_checker":
        p = rng.uniform(5, 6.5)
        a = np.sin(2 * np.pi * xx / p + rng.uniform(0, 6.3))
        b = np.sin(2 * np.pi * yy / p + rng.uniform(0, 6.3))
        return np.sign(a * b)
    raise ValueError(f"unknown texture {name!r}")


def _shape_mask(
    shape: str, cy: float, cx: float, r: float, yy: np.ndarray, xx: np.ndarray, theta: float
) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if shape == "square":
        s = 0.85 * r
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":
        R = 1.15 * r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            inside &= dx * np.cos(a) + dy * np.sin(a) <= R / 2
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """One synthetic scene (see the module docstring)."""
    H, W = height, width
    unit = min(H, W)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    classes = np.full((H, W), -1, dtype=np.int16)
    instances = np.zeros((H, W), dtype=np.int32)
    regions: list[tuple[np.ndarray, int]] = []  # (mask, class) in paint order

    # Stuff: the argmax of a random ramp plus smooth waves per region.
    k = int(rng.integers(2, 4))
    stuff = rng.choice(STUFF, size=k, replace=False)
    fields = []
    for _ in range(k):
        a = rng.uniform(0, 2 * np.pi)
        f = (np.cos(a) * xx + np.sin(a) * yy) / unit * 2.0
        for _ in range(3):
            b, freq = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 3.0)
            f += 0.25 * np.sin(
                2 * np.pi * freq * (np.cos(b) * xx + np.sin(b) * yy) / unit + rng.uniform(0, 6.3)
            )
        fields.append(f)
    which = np.argmax(np.stack(fields), axis=0)
    for j, c in enumerate(stuff):
        m = which == j
        classes[m] = c
        regions.append((m, int(c)))

    # VOID: a small patch of unlabelled clutter.
    if rng.random() < 0.3:
        h, w = (rng.uniform(0.08, 0.15, size=2) * unit).astype(int) + 2
        y0, x0 = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
        m = np.zeros((H, W), bool)
        m[y0 : y0 + h, x0 : x0 + w] = True
        classes[m] = -1
        regions.append((m, -1))

    things: list[tuple[int, bool]] = []
    min_area = 0.006 * H * W  # ~100 px at 128x128
    # Crowd: a cluster of small shapes of one thing class, one segment.
    if rng.random() < 0.3:
        c = int(rng.choice(THINGS))
        cy, cx = rng.uniform(0.2, 0.8) * H, rng.uniform(0.2, 0.8) * W
        m = np.zeros((H, W), bool)
        for _ in range(int(rng.integers(4, 7))):
            oy, ox = rng.normal(0, 0.08 * unit, size=2)
            m |= _shape_mask("disc", cy + oy, cx + ox, rng.uniform(0.04, 0.06) * unit, yy, xx, 0)
        if m.sum() >= min_area:
            things.append((c, True))
            classes[m] = c
            instances[m] = len(things)
            regions.append((m, c))

    # Things, painted in order; a new one may not hide more than half of an earlier one.
    full_area: dict[int, int] = {}
    prev: tuple[float, float, float] | None = None
    for _ in range(int(rng.integers(2, 6))):
        for _try in range(10):
            c = int(rng.choice(THINGS))
            r = rng.uniform(0.10, 0.22) * unit
            if prev is not None and rng.random() < 0.4:  # touch or overlap the previous one
                a = rng.uniform(0, 2 * np.pi)
                d = (prev[2] + r) * rng.uniform(0.8, 1.0)
                cy, cx = prev[0] + d * np.sin(a), prev[1] + d * np.cos(a)
            else:
                cy, cx = rng.uniform(0.5 * r, H - 0.5 * r), rng.uniform(0.5 * r, W - 0.5 * r)
            m = _shape_mask(CLASSES[c].shape, cy, cx, r, yy, xx, rng.uniform(0, 2 * np.pi))
            if m.sum() < min_area:
                continue
            ok = True
            for k_, area in full_area.items():
                left = np.count_nonzero((instances == k_) & ~m)
                if left < 0.5 * area or left < min_area:
                    ok = False
                    break
            if ok:
                things.append((c, False))
                classes[m] = c
                instances[m] = len(things)
                full_area[len(things)] = int(m.sum())
                regions.append((m, c))
                prev = (cy, cx, r)
                break

    image = _render(regions, yy, xx, rng)
    return Scene(image=image, classes=classes, instances=instances, things=things)


def _render(
    regions: list[tuple[np.ndarray, int]], yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    img = np.zeros((*yy.shape, 3), dtype=np.float32)
    for mask, c in regions:
        if c < 0:  # VOID clutter: grey noise
            img[mask] = rng.uniform(60, 200) + rng.normal(0, 25, size=(int(mask.sum()), 3))
            continue
        cls = CLASSES[c]
        mean = np.array(cls.color, np.float32) * (1 + rng.uniform(-0.12, 0.12, size=3))
        tex = _texture(cls.texture, yy, xx, rng)[mask] * TEXTURE_AMPLITUDE
        img[mask] = mean[None] + tex[:, None]
    img += rng.normal(0, NOISE_STD, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
