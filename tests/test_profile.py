"""`hcformer profile`: FLOP formulas against hand counts, COCO inputs, paper fidelity, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hcformer import ops
from hcformer.analysis import profile as P
from hcformer.analysis.flops import count_macs
from hcformer.errors import ConfigError
from hcformer.experiments import load_table, resolve

META = torch.device("meta")


# --------------------------------------------------------------------------------------
# Formulas in fvcore's convention (one multiply-add = one flop), against hand counts.


def test_conv_and_linear_count_one_flop_per_multiply_add():
    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, device=META)
    linear = torch.nn.Linear(10, 20, device=META)
    with count_macs() as macs:
        conv(torch.zeros(1, 3, 16, 16, device=META))  # out 8 x 8 x 8, 3 * 3 * 3 per output
        linear(torch.zeros(4, 10, device=META))
    assert macs.by_op["aten.convolution"] == 8 * 8 * 8 * (3 * 3 * 3)
    assert macs.by_op["aten.addmm"] == 4 * 10 * 20
    assert macs.total == 8 * 8 * 8 * 27 + 800


def test_deform_conv_counts_as_its_convolution():
    from torchvision.ops import deform_conv2d

    x = torch.zeros(1, 4, 8, 8, device=META)
    weight = torch.zeros(6, 4, 3, 3, device=META)
    offset = torch.zeros(1, 18, 4, 4, device=META)
    mask = torch.zeros(1, 9, 4, 4, device=META)
    with count_macs() as macs:
        out = deform_conv2d(x, offset, weight, stride=2, padding=1, mask=mask)
    assert out.shape == (1, 6, 4, 4)
    assert macs.by_op["torchvision.deform_conv2d"] == 6 * 4 * 4 * (4 * 3 * 3)  # = 3456
    with count_macs() as plain:
        F.conv2d(x, weight, stride=2, padding=1)
    assert plain.total == macs.total


def test_norms_upsampling_and_einsum_follow_fvcore():
    x = torch.zeros(2, 5, 6, 8, device=META)
    with count_macs() as macs:
        F.layer_norm(x.permute(0, 2, 3, 1), (5,), torch.ones(5, device=META), None)
        F.group_norm(x, 5, torch.ones(5, device=META), torch.zeros(5, device=META))
        F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        torch.einsum(
            "qc,qhw->chw", torch.zeros(7, 3, device=META), torch.zeros(7, 4, 5, device=META)
        )
        torch.sigmoid(x) * x + x  # element-wise: ignored
    n = 2 * 5 * 6 * 8
    assert macs.by_op["aten.native_layer_norm"] == 5 * n
    assert macs.by_op["aten.native_group_norm"] == 5 * n
    assert macs.by_op["aten.upsample_bilinear2d"] == 4 * (2 * 5 * 24 * 32)
    assert macs.by_op["aten.bmm"] == 7 * 3 * 4 * 5
    assert macs.total == 10 * n + 4 * 2 * 5 * 24 * 32 + 7 * 3 * 4 * 5


def _listing_clustering_macs(b: int, c: int, h: int, w: int) -> int:
    """The paper's Listing 1 (appendix C) counted by plain FlopCounterMode: its einsum is
    what fvcore saw in the authors' model (halved: FlopCounterMode counts 2 per multiply-add)."""
    feat = torch.zeros(b, c, h, w, device=META)
    coarse = torch.zeros(b, c, h // 2, w // 2, device=META)
    counter = FlopCounterMode(display=False)
    with counter:
        cand = F.unfold(coarse, kernel_size=3, padding=1).reshape(b, c, 9, -1)
        fine = F.unfold(feat, kernel_size=2, stride=2).reshape(b, c, 4, -1)
        torch.einsum("bkcn,bkpn->bcpn", cand, fine)
    return counter.get_total_flops() // 2


def test_clustering_and_decode_counted_as_the_papers_einsum():
    b, c, h, w = 2, 16, 8, 12
    feat = torch.zeros(b, c, h, w, device=META)
    coarse = torch.zeros(b, c, h // 2, w // 2, device=META)
    with count_macs() as clustering:
        assignment = ops.clustering(feat, coarse, torch.tensor(0.1, device=META))
    assert clustering.total == 9 * b * c * h * w
    assert clustering.total == _listing_clustering_macs(b, c, h, w)
    with count_macs() as decode:
        ops.decode(torch.zeros(b, 5, h // 2, w // 2, device=META), assignment)
    assert decode.total == 9 * b * 5 * h * w


# --------------------------------------------------------------------------------------
# Inputs.


def test_coco_inputs_are_the_100_val_sizes_resized_and_padded():
    assert P.resize_shortest_edge(480, 640, 800, 1333) == (800, 1067)
    assert P.resize_shortest_edge(300, 1000, 800, 1333) == (400, 1333)  # long side capped
    sizes = P.profile_inputs(resolve("coco_panoptic/hcformer-r50-L3-D8-Q100"))
    assert sum(s.count for s in sizes) == 100
    padded: dict[tuple[int, int], int] = {}
    for s in sizes:
        padded[s.padded] = padded.get(s.padded, 0) + s.count
        assert s.padded[0] % 32 == 0 and s.padded[1] % 32 == 0
        assert s.padded[0] - 32 < s.resized[0] <= s.padded[0] and min(s.resized) <= 800
    # notes/profiling.md: 21 distinct padded sizes; 800x1088 x33, 800x1216 x25, 1216x800 x11.
    assert len(padded) == 21
    assert (padded[(800, 1088)], padded[(800, 1216)], padded[(1216, 800)]) == (33, 25, 11)


def test_ade20k_and_cityscapes_inputs():
    (ade,) = P.profile_inputs(resolve("ade20k/hcformer-r50-L3-D8-Q100"))
    assert ade.padded == ade.original == (512, 512)
    (ade_l,) = P.profile_inputs(resolve("ade20k/hcformer-swinl-L3-D8-Q100"))
    assert ade_l.padded == (640, 640)
    (city,) = P.profile_inputs(resolve("cityscapes/hcformer-r50-L3-D9-Q100"))
    assert city.padded == (1024, 2048)


# --------------------------------------------------------------------------------------
# Paper fidelity: params within 1.0M, GFLOPs within 10%, and the steps of
# an ablation table within 1 GFLOP of the paper's. Counted on meta tensors.


def _paper(table: str, label: str) -> dict:
    return load_table(table).row(label).values


def _count(exp_id: str) -> dict:
    return P.count_flops(resolve(exp_id))


@pytest.fixture(scope="module")
def ade_hierarchy() -> dict[int, dict]:
    return {k: _count(f"ade20k/hcformer-r50-L{k}-D8-Q100") for k in range(4)}


def test_fidelity_ade20k_hierarchy_levels(ade_hierarchy: dict[int, dict]):
    """Table V: HCFormer R50 on ADE20K at L0..L3 (one 512x512 input)."""
    for k, ours in ade_hierarchy.items():
        paper = _paper("tableV", f"HCFormer R50 L{k}")
        assert abs(ours["params_m"] - paper["params_m"]) <= 1.0, (k, ours["params_m"])
        assert abs(ours["gflops"] - paper["gflops"]) <= 0.1 * paper["gflops"], (k, ours["gflops"])
    for k in range(1, 4):  # what each clustering module (and its DCNv2) costs
        step = ade_hierarchy[k]["gflops"] - ade_hierarchy[k - 1]["gflops"]
        paper_step = (
            _paper("tableV", f"HCFormer R50 L{k}")["gflops"]
            - _paper("tableV", f"HCFormer R50 L{k - 1}")["gflops"]
        )
        assert abs(step - paper_step) <= 1.0, (k, step, paper_step)


def test_fidelity_ade20k_decoder_layers_and_plus(ade_hierarchy: dict[int, dict]):
    """Table VII (decoder layers) and table 3's HCFormer+ R50 row."""
    d8 = ade_hierarchy[3]
    d1 = _count("ade20k/hcformer-r50-L3-D1-Q100")
    paper1, paper8 = _paper("tableVII", "HCFormer R50 D1"), _paper("tableVII", "HCFormer R50 D8")
    assert abs(d1["params_m"] - paper1["params_m"]) <= 1.0
    assert abs((d8["gflops"] - d1["gflops"]) - (paper8["gflops"] - paper1["gflops"])) <= 1.0
    plus = _count("ade20k/hcformer-r50-L3-D8-Q100-plus")
    paper_plus = _paper("table3", "HCFormer+ R50")["gflops"]
    assert abs(plus["gflops"] - paper_plus) <= 0.1 * paper_plus
    assert plus["gflops_model"] > d8["gflops_model"]  # the encoder costs something


@pytest.mark.parametrize(
    ("table", "label", "exp_id"),
    [
        ("table3", "HCFormer Swin-S", "ade20k/hcformer-swins-L3-D8-Q100"),
        ("table4", "HCFormer R50", "cityscapes/hcformer-r50-L3-D9-Q100"),
    ],
)
def test_fidelity_swin_and_cityscapes(table: str, label: str, exp_id: str):
    ours, paper = _count(exp_id), _paper(table, label)
    assert abs(ours["gflops"] - paper["gflops"]) <= 0.1 * paper["gflops"], ours["gflops"]


@pytest.mark.slow
def test_fidelity_coco_r50():
    """Table 1 / 5: HCFormer R50 on COCO, averaged over the 100 val sizes (38.4M by hand)."""
    ours = _count("coco_panoptic/hcformer-r50-L3-D8-Q100")
    paper = _paper("table1", "HCFormer R50")
    assert abs(ours["params_m"] - 38.4) <= 0.1  # a count by hand from the authors' code
    assert abs(ours["params_m"] - paper["params_m"]) <= 1.0
    assert abs(ours["gflops"] - paper["gflops"]) <= 0.1 * paper["gflops"]
    assert ours["gflops_by_op"]["torchvision.deform_conv2d"] > 0
    assert 3 < ours["gflops_postprocess"] < 8  # mostly the 133 x 100 x h x w semantic einsum


# --------------------------------------------------------------------------------------
# The command.


def test_profile_cli_tiny_table5_writes_documented_json(tmp_path: Path):
    out = tmp_path / "f.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hcformer.cli",
            "profile",
            "--table",
            "table5",
            "--scale",
            "tiny",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "HCFormer R50 L3" in proc.stdout and "gflops" in proc.stdout
    data = json.loads(out.read_text())
    assert (data["table"], data["scale"]) == ("table5", "tiny")
    rows = data["rows"]
    assert [r["label"] for r in rows] == [f"HCFormer R50 L{k}" for k in range(4)]
    for row in rows:
        assert row["status"] == "ok" and row["experiment"].startswith("coco_panoptic/")
        for key in ("params_m", "params_trainable_m", "gflops", "gflops_model",
                    "gflops_postprocess", "gflops_by_op", "inputs", "paper", "diff"):  # fmt: skip
            assert key in row, key
        assert row["paper"]["gflops"] == _paper("table5", row["label"])["gflops"]
        assert row["diff"]["gflops"] == pytest.approx(row["gflops"] - row["paper"]["gflops"])
        # Synthetic data: its one image size (experiments/scales/tiny.yaml).
        size = _tiny_size(row["experiment"])
        assert row["inputs"] == [{"padded": size, "resized": size, "original": size, "count": 1}]
    gflops = [r["gflops"] for r in rows]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]  # modules cost something
    params = [r["params_m"] for r in rows]
    assert params == sorted(params) and params[0] < params[-1]
    assert "torchvision.deform_conv2d" not in rows[0]["gflops_by_op"]  # no DCNv2 at L0
    assert rows[3]["gflops_by_op"]["torchvision.deform_conv2d"] > 0


@pytest.mark.parametrize("level", [0, 1])
def test_levels_below_3_count_one_bilinear_resize_of_the_masks(level: int):
    """Below L = 3 the masks stay at stride 32 / 2**L and are resized once to the padded input,
    as the authors' inference: fvcore's 4 flops per output element of that one resize, and no
    other bilinear upsampling (no 2x steps down to stride 4)."""
    cfg = resolve(f"coco_panoptic/hcformer-r50-L{level}-D8-Q100", "tiny")
    result = P.count_flops(cfg)
    ((h, w),) = {tuple(s["padded"]) for s in result["inputs"]}
    assert [s["resized"] for s in result["inputs"]] == [s["original"] for s in result["inputs"]]
    queries = cfg.model.head.queries
    assert result["gflops_by_op"]["aten.upsample_bilinear2d"] * 1e9 == pytest.approx(
        4 * queries * h * w, rel=1e-9
    )


def _tiny_size(experiment: str) -> list[int]:
    from hcformer.experiments import resolve

    return list(resolve(experiment, "tiny").data.synthetic.size)


def test_latency_is_measured_on_real_tensors():
    result = P.profile_table("table5", "tiny", rows=["HCFormer R50 L3"], latency=True, repeats=2)
    (row,) = result["rows"]
    assert row["latency_ms"] > 0 and row["latency_input"] == _tiny_size(row["experiment"])
    assert result["device"] == "cpu"
    assert row["paper"] == {"gflops": 87, "params_m": 38}  # table 5 prints no latency


def test_rows_that_need_missing_heads_are_skipped(monkeypatch: pytest.MonkeyPatch):
    def not_built(cfg):
        raise ConfigError(f"model.head.type: {cfg.head.type!r} is not built yet")

    monkeypatch.setattr(P, "build_model", not_built)
    result = P.profile_table("tableI_a", "tiny")
    assert [r["status"] for r in result["rows"]] == ["skipped"] * 4
    assert "requires baselines" in result["rows"][0]["reason"]
    quoted = P.profile_table("table3", "tiny", rows=["MaskFormer R50"])["rows"]
    assert quoted[0]["status"] == "quoted" and quoted[0]["paper"] == {"gflops": 53}


def test_unknown_rows_and_tables_are_clear_errors():
    with pytest.raises(ConfigError, match=r"table table5: unknown rows \['L7'\]; rows: "):
        P.profile_table("table5", "tiny", rows=["L7"])
    with pytest.raises(ConfigError, match=r"unknown table 'table0'"):
        P.profile_table("table0", "tiny")
