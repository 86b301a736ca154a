"""``hcformer visualize``: the Fig. 5-style view of a trained run's hierarchical clustering.

Fig. 5 of the paper (and Figs. II, III of its appendix) shows, for a validation image, the
cluster boundaries of every clustering level, the undersegmentation error in red, and the
predicted mask beside the ground truth. ``hcformer evaluate`` saves what that needs for a few
validation images as ``<run>/visual/<stem>.npz`` (the image, the hard cluster map of each level
upsampled to the image, the prediction and the ground truth); this module only draws them (it
runs no model).

Undersegmentation error (red): a cluster "leaks" where it covers pixels of a ground-truth segment
other than the one it overlaps most; those pixels are drawn red (the per-pixel view of the
undersegmentation error of Neubert & Protzel that ``useg_level<i>`` reports).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np

from hcformer.errors import DataError, HCFormerError
from hcformer.runfolder import VISUAL

IGNORE = 255


def load_visual(path: Path) -> dict[str, Any]:
    """An npz of ``hcformer evaluate`` (keys documented in hcformer/evaluation/formats.py):
    ``image`` [H,W,3] uint8, ``clusters`` [L,H,W] (row i = level i + 1, after i + 1 clustering
    steps down from stride 32; the last row is the finest), ``pred`` [H,W] and ``gt`` [H,W]
    (255 = no segment / ignore)."""
    try:
        data = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz ({exc})") from None
    for key in ("image", "clusters", "pred", "gt"):
        if key not in data:
            raise DataError(f"{path}: missing key {key!r}; keys: {', '.join(sorted(data))}")
    levels = [np.asarray(c) for c in data["clusters"]]
    image = np.asarray(data["image"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{path}: image has shape {image.shape}, expected [H, W, 3]")
    size = image.shape[:2]
    for name, array in [("pred", data["pred"]), ("gt", data["gt"])] + [
        (f"level {i}", lv) for i, lv in enumerate(levels)
    ]:
        if tuple(np.asarray(array).shape) != size:
            raise DataError(f"{path}: {name} has shape {np.asarray(array).shape}, expected {size}")
    return {
        "image": image.astype(np.uint8),
        "levels": levels,
        "prediction": np.asarray(data["pred"]),
        "ground_truth": np.asarray(data["gt"]),
    }


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour belongs to another cluster."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def leakage(clusters: np.ndarray, gt: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """Pixels of each cluster outside the ground-truth segment it overlaps most (ignored gt
    pixels never count)."""
    valid = gt != ignore
    _, cl = np.unique(clusters, return_inverse=True)
    cl = cl.reshape(clusters.shape)
    _, g = np.unique(np.where(valid, gt, -1), return_inverse=True)
    g = g.reshape(gt.shape)
    n_gt = int(g.max()) + 1
    counts = np.zeros((int(cl.max()) + 1, n_gt), dtype=np.int64)
    np.add.at(counts, (cl[valid], g[valid]), 1)
    majority = counts.argmax(axis=1)
    return valid & (g != majority[cl])


def colorize(labels: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """A fixed colour per label (golden-ratio hues), black for ignored pixels."""
    ids = np.unique(labels)
    table = {}
    for value in ids:
        if value == ignore:
            table[value] = (0, 0, 0)
            continue
        h = (int(value) * 0.618033988749895) % 1.0
        table[value] = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.65, 0.95))
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    for value, colour in table.items():
        out[labels == value] = colour
    return out


def level_panel(
    image: np.ndarray, clusters: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, float]:
    """The image in grey with the level's cluster boundaries (white) and leaking pixels (red), and the
    percentage of valid pixels that leak."""
    # Grey, so that the red of the error cannot be confused with a red object.
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) * 0.7
    panel = np.repeat(grey, 3, axis=2).astype(np.uint8)
    leak = leakage(clusters, gt)
    panel[leak] = (0.3 * panel[leak] + 0.7 * np.array([255, 0, 0])).astype(np.uint8)
    panel[boundaries(clusters)] = (255, 255, 255)
    valid = max(int((gt != IGNORE).sum()), 1)
    return panel, 100.0 * float(leak.sum()) / valid


def draw(visuals: list[tuple[str, dict[str, Any]]], title: str, out: Path) -> Path:
    # matplotlib here, not at the top: it costs 0.4 s and selecting the Agg backend is global.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_levels = max(len(v["levels"]) for _, v in visuals)
    cols = 1 + n_levels + 2
    fig, axes = plt.subplots(
        len(visuals), cols, figsize=(2.4 * cols, 2.4 * len(visuals)), squeeze=False
    )
    for r, (stem, vis) in enumerate(visuals):
        row = axes[r]
        row[0].imshow(vis["image"])
        row[0].set_title(stem, fontsize=7)
        for i in range(n_levels):
            if i < len(vis["levels"]):
                panel, err = level_panel(vis["image"], vis["levels"][i], vis["ground_truth"])
                row[1 + i].imshow(panel)
                row[1 + i].set_title(f"level {i + 1}: {err:.1f}% leak", fontsize=7)
        row[-2].imshow(colorize(vis["prediction"]))
        row[-2].set_title("prediction", fontsize=7)
        row[-1].imshow(colorize(vis["ground_truth"]))
        row[-1].set_title("ground truth", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def draw_run(run_dir: str | Path, out: str | Path, max_images: int = 4) -> Path:
    """Draw the first ``max_images`` views a run's evaluation saved (``<run>/visual/*.npz``)
    into ``out``; the run has none before ``hcformer evaluate`` has run."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / VISUAL).glob("*.npz"))[:max_images]
    if not files:
        raise HCFormerError(
            f"{run_dir / VISUAL}: no .npz files (hcformer evaluate writes them; is the run done?)"
        )
    visuals = [(f.stem, load_visual(f)) for f in files]
    title = (
        f"{run_dir}: cluster boundaries after each clustering level (coarse to fine), "
        "undersegmentation error in red"
    )
    return draw(visuals, title, Path(out))
