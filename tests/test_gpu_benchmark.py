"""``benchmarks/gpu.py --device cpu --quick``: the GPU benchmark's code paths at tiny shapes.

Runs it once in a subprocess in which mlflow, snakemake, submitit and pycocotools cannot be
imported (the GPU machine lacks them), then checks the JSON's sections, that every planned
measurement is accounted for (a result, a recorded failure or a recorded skip), the operator
counts of folding, and the readable table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("mlflow", "snakemake", "submitit", "pycocotools")
RUN = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # import raises ImportError
sys.argv = ["benchmarks/gpu.py", *{argv!r}]
runpy.run_path("benchmarks/gpu.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    argv = ["--device", "cpu", "--quick", "--threads", "2", "--budget-s", "300", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", RUN.format(blocked=BLOCKED, argv=argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".txt").read_text()


@pytest.mark.slow
def test_sections_and_every_measurement_accounted_for(quick_run):
    result, _ = quick_run
    sections = result["sections"]
    assert set(sections) == {"environment", "ops", "latency", "training", "pairs", "profile", "dcn"}
    for name in ("environment", "ops", "latency", "training"):
        assert sections[name]["status"] == "ok", (name, sections[name]["failed"])
    env = sections["environment"]["results"][0]
    assert env["device"] == "cpu" and env["quick"] is True and env["budget_s"] == 300
    # ops: reference and fast always run on a CPU, forward and forward+backward
    ops = {(r["impl"], r["phase"]) for r in sections["ops"]["results"]}
    assert {("reference", "forward"), ("fast", "forward_backward")} <= ops
    lat = sections["latency"]
    done = {(r["group"], r["model"], r["batch"], r["dtype"], r["variant"]) for r in lat["results"]}
    for model in ("PSPNet", "HC-PSPNet"):  # first in the plan: always within the budget
        for dtype in ("float32", "bfloat16"):
            for variant in ("eager", "fused", "fused_cl"):
                assert ("ade20k", model, 1, dtype, variant) in done
    # CUDA graphs cannot run on a CPU: recorded as skipped, never silently dropped.
    graph_skips = [s for s in lat["skipped"] if "cuda_graph" in s["variant"]]
    assert graph_skips and all(s["reason"] == "CUDA graphs need a CUDA device" for s in graph_skips)
    # 4 models x 2 dtypes x 5 variants at batch 1, the compiled model, 4 x 3 at batch 2
    # (float32), FCN-32s x 2 x 5: each a result, a failure or a skip.
    planned = 4 * 2 * 5 + 1 + 4 * 3 + 2 * 5
    assert len(lat["results"]) + len(lat["failed"]) + len(lat["skipped"]) == planned
    train = sections["training"]
    assert len(train["results"]) + len(train["failed"]) + len(train["skipped"]) == 5
    assert sum(s["reason"] == "--quick" for s in train["skipped"]) == 3
    assert train["results"], train["skipped"]
    for r in train["results"]:
        assert r["seconds_per_iteration"] > 0 and r["batch"] == 2 and r["input_size"] == [192, 192]


@pytest.mark.slow
def test_compiled_model_and_operator_counts(quick_run):
    result, _ = quick_run
    rows = result["sections"]["latency"]["results"]
    by = {(r["model"], r["batch"], r["dtype"], r["variant"]): r for r in rows}
    compiled = by.get(("HC-PSPNet", 1, "float32", "compiled"))
    if compiled is None:  # only a loaded machine runs out of budget before it
        skips = result["sections"]["latency"]["skipped"]
        assert any(s["variant"] == "compiled" and s["reason"] == "budget" for s in skips)
    else:
        assert compiled["graph_breaks"] == 0
    # Folding removes each folded BN's multiply and add: fewer aten ops per forward.
    for model in ("PSPNet", "HC-PSPNet"):
        eager = by[(model, 1, "float32", "eager")]["kernels"]["aten_ops"]
        fused = by[(model, 1, "float32", "fused")]["kernels"]["aten_ops"]
        assert fused < eager, model
    pairs = result["sections"]["pairs"]["results"]
    pair = next(
        p
        for p in pairs
        if p["model"] == "HC-PSPNet" and p["variant"] == "eager" and p["batch"] == 1
    )
    want = (
        by[("HC-PSPNet", 1, pair["dtype"], "eager")]["median_ms"]
        / by[("PSPNet", 1, pair["dtype"], "eager")]["median_ms"]
    )
    assert pair["ratio"] == pytest.approx(want)
    assert pair["paper_ratio"] == pytest.approx(19.0 / 48.7)


@pytest.mark.slow
def test_readable_table(quick_run):
    _, text = quick_run
    assert text.startswith("benchmarks/gpu.py: ")
    for heading in ("== status ==", "== ops:", "== latency", "== ratios", "== training step"):
        assert heading in text
    assert "HC-PSPNet / PSPNet" in text and "paper 0.39x" in text
    assert "skipped  " in text and "CUDA graphs need a CUDA device" in text
    latency = text.split("== latency")[1].split("\n\n")[0].splitlines()
    assert latency[1].split()[:4] == ["group", "model", "b", "dtype"]
    assert any(line.split()[:2] == ["ade20k", "HC-PSPNet"] for line in latency)


@pytest.mark.slow
def test_profile_and_dcn_sections(quick_run):
    result, text = quick_run
    sections = result["sections"]
    assert sections["profile"]["status"] == "ok", sections["profile"]["failed"]
    rows = {(r["group"], r["model"]): r for r in sections["profile"]["results"]}
    hc = rows[("ade20k", "HC-PSPNet")]
    assert hc["kernels"] > 0 and hc["kernel_ms"] > 0 and hc["top"]
    # each clustering module of eq. (3) is a region of its own, inside the backbone's
    assert {"backbone", "head", "backbone.clustering.layer2"} <= set(hc["regions_ms"])
    assert hc["regions_ms"]["backbone.clustering.layer2"] < hc["regions_ms"]["backbone"]
    ops = rows[("ops", "eq. (3)+(5) forward+backward")]
    assert ops["variant"] == "fast" and ops["kernels"] > 0  # no triton on a CPU
    assert rows[("training", "HCFormer R50 COCO")]["kernels"] > 0
    assert any("run_backward" in line for line in sections["profile"]["host"])
    dcn = sections["dcn"]["results"]
    assert {(r["impl"], r["backward"], r["tf32"]) for r in dcn} == {
        (impl, backward, tf32)
        for impl in ("torchvision", "sampled")
        for backward in (False, True)
        for tf32 in (False, True)
    }
    assert all(r["median_ms_all_six"] > 0 for r in dcn)
    for heading in ("== profile:", "== host: cProfile", "== DCNv2"):
        assert heading in text


def test_unknown_section_is_one_line_error():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--sections", "ops,kernels"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "benchmarks/gpu.py: --sections 'ops,kernels': unknown ['kernels'] (expected a "
        "comma-separated subset of ops,latency,training,profile,dcn)"
    ]
