"""Ablation figures, the Fig. 5-style view, and the results README (hcformer figures, visualize,
report), on stand-in run folders."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from hcformer import cli
from hcformer.analysis.figures import figure_data
from hcformer.analysis.report import kendall_tau
from hcformer.analysis.visualize import boundaries, leakage
from hcformer.experiments import load_table


def test_ablation_figure_has_a_point_per_seed_and_the_papers_line(
    tmp_path, paper_values, fill_table, aggregate
):
    results = tmp_path / "smoke"
    fill_table(results, "tableII", lambda e, s: {"pq": 10.0 + s})
    cells = aggregate(results, "tableII")
    x_col, hue_col, metrics, points = figure_data(cells)
    table = load_table("tableII")
    assert (x_col, hue_col, metrics) == ("hierarchy_level", "dcnv2", ["pq"])
    ours = [p for p in points if p["what"] == "ours"]
    paper = [p for p in points if p["what"] == "paper"]
    assert len(ours) == 3 * len(table.rows) and len(paper) == len(table.rows)
    values = paper_values("tableII")
    assert sorted(p["value"] for p in paper) == sorted(v["pq"] for v in values.values())
    assert {p["hue"] for p in points} == {"with DCNv2", "without DCNv2"}
    assert cli.main(["figures", "--results", str(results), "--table", "tableII"]) == 0
    png = Image.open(results / "figures" / "tableII.png")
    assert png.size[0] > 600 and np.asarray(png).std() > 10  # drawn, not blank
    assert (results / "figures" / "tableII.pdf").read_bytes().startswith(b"%PDF")


def test_table_iv_has_one_panel_per_dataset(tmp_path, fill_table, aggregate):
    results = tmp_path / "smoke"
    fill_table(results, "tableIV", lambda e, s: {"pq": 1.0, "miou": 2.0})
    _, _, metrics, points = figure_data(aggregate(results, "tableIV"))
    assert metrics == ["coco_pq", "ade20k_miou", "cityscapes_miou"]
    assert {p["x"] for p in points} == {20, 50, 100, 150, 200}


def _brute_leakage(clusters, gt):
    out = np.zeros(gt.shape, bool)
    for c in np.unique(clusters):
        inside = (clusters == c) & (gt != 255)
        if inside.any():
            labels, counts = np.unique(gt[inside], return_counts=True)
            out |= inside & (gt != labels[counts.argmax()])
    return out


def test_leakage_and_boundaries_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        clusters = rng.integers(0, 6, (12, 10))
        gt = rng.integers(0, 4, (12, 10)).astype(np.uint8)
        gt[rng.random((12, 10)) < 0.1] = 255
        assert np.array_equal(leakage(clusters, gt), _brute_leakage(clusters, gt))
    labels = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 1]])
    expected = np.zeros((3, 3), bool)
    for i, j in itertools.product(range(3), range(3)):
        right = j + 1 < 3 and labels[i, j] != labels[i, j + 1]
        down = i + 1 < 3 and labels[i, j] != labels[i + 1, j]
        expected[i, j] = right or down
    assert np.array_equal(boundaries(labels), expected)


def test_visualize_draws_every_level_from_a_runs_npz(tmp_path):
    run = tmp_path / "run"
    (run / "visual").mkdir(parents=True)
    rng = np.random.default_rng(0)
    h, w = 64, 96
    for stem in ("a", "b"):
        gt = np.zeros((h, w), np.uint8)
        gt[:, w // 2 :] = 1
        clusters = np.stack(
            [np.kron(rng.integers(0, 50, (h // s, w // s)), np.ones((s, s))) for s in (16, 8, 4)]
        )
        np.savez_compressed(
            run / "visual" / f"{stem}.npz",
            image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            clusters=clusters.astype(np.int32),
            pred=gt.copy(),
            gt=gt,
            stride=np.array([16, 8, 4], np.int32),
        )
    out = tmp_path / "fig5.png"
    assert cli.main(["visualize", "--run-dir", str(run), "--out", str(out)]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > img.shape[0]  # 2 rows x 6 panels
    red = (img[..., 0] > 200) & (img[..., 1] < 120) & (img[..., 2] < 120)
    assert red.sum() > 0  # leaking pixels are drawn red


def test_visualize_errors_name_the_file(tmp_path, capsys):
    assert (
        cli.main(["visualize", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    )
    assert "no .npz files" in capsys.readouterr().err
    (tmp_path / "visual").mkdir()
    np.savez(tmp_path / "visual" / "a.npz", image=np.zeros((4, 4, 3), np.uint8))
    assert (
        cli.main(["visualize", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    )
    assert "missing key 'clusters'" in capsys.readouterr().err


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([3, 2, 1], [10, 20, 30]) == -1.0
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)


def test_report_says_what_the_scale_means(tmp_path, fill_table, aggregate):
    results = tmp_path / "smoke"
    fill_table(results, "table5", lambda e, s: {"pq": float(re.search(r"-L(\d)-", e).group(1))})
    aggregate(results, "table5")
    assert cli.main(["report", "--results", str(results), "--scale", "smoke"]) == 0
    text = (results / "README.md").read_text()
    assert "not results" in text and "scale `smoke`" in text
    assert "### table5:" in text and "*not aggregated yet*" in text  # other tables: said so
    assert "| HCFormer R50 L3 |" in text and "(47.7)" in text
    assert "over 4 rows = +1.00" in text  # our medians rise with the level, as the paper's
