"""The Snakemake workflow: dry runs of the README's two commands, targets, config schema, lint.

``snakemake --cores all all_tables`` must be the smoke scale on this machine's cores;
``snakemake --profile slurm all_tables`` the paper scale with enough concurrency for every run
at once, one SLURM job per (experiment, seed) with the experiment's GPUs. Expected counts come
from the registry (hcformer.experiments), not from the workflow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hcformer.experiments import all_experiments, experiments_for_table, load_table, load_tables

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


WORK: Path | None = None  # the fresh folder the dry runs run in (``_fresh_workdir``)


@pytest.fixture(scope="module", autouse=True)
def _fresh_workdir(tmp_path_factory: pytest.TempPathFactory):
    """Dry runs in a fresh folder holding only the workflow's entry points: outputs a user
    already made in the checkout (results/, datasets/) would make them 'nothing to be done'."""
    global WORK
    WORK = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "workflow", "environment.yml", "slurm"):
        os.symlink(ROOT / name, WORK / name)
    yield
    WORK = None


def snakemake(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=cwd or WORK,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def banner(out: str) -> dict[str, str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("hcformer workflow:"))
    return dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())


def job_counts(out: str) -> Counter:
    counts = Counter()
    section = out.split("Job stats:", 1)[1]
    for line in section.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def run_jobs(out: str) -> list[dict[str, str]]:
    """The run jobs of a dry run with their wildcards and resources."""
    jobs = []
    for block in out.split("\nrule run:")[1:]:
        wildcards = re.search(r"wildcards: (.*)", block).group(1)
        resources = re.search(r"resources: (.*)", block).group(1)
        shell = re.search(r"Shell command: (.*)", block).group(1)
        job = dict(kv.split("=", 1) for kv in wildcards.split(", "))
        job.update({f"res.{k}": v for k, v in (kv.split("=", 1) for kv in resources.split(", "))})
        job["shell"] = shell
        jobs.append(job)
    return jobs


@pytest.fixture(scope="module")
def smoke_dry_run():
    out = snakemake("-n", "-p", "--cores", "all", "all_tables")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def slurm_dry_run():
    out = snakemake("-n", "-p", "--profile", "slurm", "all_tables")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_main_job_is_smoke_on_all_local_cores(smoke_dry_run):
    info = banner(smoke_dry_run)
    assert info["scale"] == "smoke" and info["launcher"] == "inline"
    assert int(info["cores"]) == os.cpu_count()
    assert info["results"] == "results/smoke"
    experiments = all_experiments("smoke")
    counts = job_counts(smoke_dry_run)
    assert counts["run"] == len(experiments)  # seeds batched: one process per experiment
    assert counts["table"] == counts["aggregate_table"] == counts["profile"] == len(load_tables())
    assert counts["figure"] == sum(t.figure for t in load_tables()) == 7  # `figure: true`
    assert counts["data"] == 4 and counts["mlflow_store"] == 1
    jobs = run_jobs(smoke_dry_run)
    assert {j["exp"] for j in jobs} == set(experiments)
    assert all("--seeds 0 1 2" in j["shell"] and "--launcher inline" in j["shell"] for j in jobs)
    assert all(j["res.gpus"] == "0" for j in jobs)


def test_slurm_profile_is_the_paper_scale_with_a_job_per_run(slurm_dry_run):
    info = banner(slurm_dry_run)
    assert info["scale"] == "paper" and info["launcher"] == "slurm"
    experiments = all_experiments("paper")
    n_runs = 3 * len(experiments)
    assert 190 <= n_runs <= 220  # about 68 experiments x 3 seeds
    assert int(info["cores"]) >= n_runs  # every run's blocking rule can wait at once
    assert job_counts(slurm_dry_run)["run"] == n_runs
    jobs = run_jobs(slurm_dry_run)
    assert Counter(j["exp"] for j in jobs) == Counter({e: 3 for e in experiments})
    for job in jobs:
        resources = experiments[job["exp"]].config.resources
        assert int(job["res.gpus"]) == resources["gpus"] >= 1
        assert int(job["res.runtime"]) == resources["time_min"]
        assert "--launcher slurm" in job["shell"] and f"--seed {job['seed']} " in job["shell"]
    # Resources of every table: Swin-L rows ask for more GPUs than R50 rows (App. D).
    by_exp = {j["exp"]: int(j["res.gpus"]) for j in jobs}
    for table in load_tables():
        for exp in experiments_for_table(table.id, "paper"):
            assert by_exp[exp.id] == exp.config.resources["gpus"], (table.id, exp.id)
    assert (
        by_exp["coco_panoptic/hcformer-swinl-L3-D8-Q200"]
        > by_exp["coco_panoptic/hcformer-r50-L3-D8-Q100"]
    )


def test_command_line_config_adds_to_the_slurm_profile():
    """`--config` on the command line adds to the profile's settings (its `configfile:`), never
    replaces them: setting the partition keeps the paper scale on SLURM, and `scale=smoke` runs
    the smoke scale through the slurm launcher, one job per (experiment, seed)."""
    out = snakemake(
        "-n", "-p", "--profile", "slurm", "all_tables",
        "--config", "slurm={partition: gpu, account: myproj}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    info = banner(text)
    assert info["scale"] == "paper" and info["launcher"] == "slurm"
    jobs = run_jobs(text)
    assert len(jobs) == 3 * len(all_experiments("paper"))
    for job in jobs:
        assert "--scale paper" in job["shell"] and "--launcher slurm" in job["shell"]
        assert "--partition gpu --account myproj" in job["shell"]
        assert f"--seed {job['seed']} " in job["shell"]

    out = snakemake("-n", "-p", "--profile", "slurm", "all_tables", "--config", "scale=smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    info = banner(text)
    assert info["scale"] == "smoke" and info["launcher"] == "slurm"
    assert info["results"] == "results/smoke" and int(info["cores"]) == 256
    jobs = run_jobs(text)
    assert len(jobs) == 3 * len(all_experiments("smoke"))  # not batched: a job per seed
    assert all("--scale smoke" in j["shell"] and "--launcher slurm" in j["shell"] for j in jobs)
    assert not any("--partition" in j["shell"] for j in jobs)  # none set anywhere


@pytest.mark.parametrize("value", ["true", "True", "false"])
def test_boolean_config_takes_true_and_false_as_yaml_writes_them(value):
    """`--config profile_latency=true` (docs/pipeline.md) turns latency on; Snakemake itself
    reads only `True`/`False` as booleans."""
    out = snakemake(
        "-n", "-p", "--cores", "1", "table_table5", "--config", f"profile_latency={value}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    profile = [ln for ln in out.stdout.splitlines() if "hcformer profile --table table5" in ln]
    assert profile and all(("--latency" in ln) == (value.lower() == "true") for ln in profile)


def test_a_boolean_config_that_is_not_true_or_false_is_refused():
    out = snakemake("-n", "--cores", "1", "table_table5", "--config", "profile_latency=maybe")
    assert out.returncode != 0
    assert "'maybe' is not of type 'boolean'" in out.stdout + out.stderr


def test_slurm_profile_is_found_at_the_top_level_and_no_default_profile():
    assert (ROOT / "slurm").resolve() == (ROOT / "workflow" / "profiles" / "slurm").resolve()
    assert (ROOT / "slurm" / "config.yaml").is_file()
    assert not list(ROOT.glob("**/profiles/default"))


def test_table_target_runs_only_its_experiments():
    out = snakemake("-n", "--cores", "1", "table_tableV", "--config", "scale=tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert banner(text)["scale"] == "tiny"
    counts = job_counts(text)
    assert counts["run"] == len(experiments_for_table("tableV", "tiny")) == 4
    assert counts["figure"] == 1 and counts["table"] == 1 and "report" not in counts
    assert "results/tiny/tables/tableV.tex" in text


def test_config_is_checked_against_the_schema():
    out = snakemake("-n", "--cores", "1", "all_tables", "--config", "scale=huge")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "huge" in text and "is not one of" in text and "scale" in text


def test_lint_and_format():
    out = snakemake("--lint")
    assert out.returncode == 0 and "good condition" in out.stdout + out.stderr, out.stdout[-3000:]
    snakefmt = shutil.which("snakefmt", path=str(BIN)) or "snakefmt"
    fmt = subprocess.run(
        [snakefmt, "--check", "Snakefile", "workflow"], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stderr[-2000:]


def test_paper_inputs_are_checked_before_anything_is_submitted(tmp_path):
    """At paper scale the data rule runs `hcformer check-data`, which fails naming the first
    missing dataset file (with the command that makes it), then the first missing pretrained
    weight, so no run of that dataset is submitted (tests/test_prepare_data.py checks the
    layouts in detail)."""
    out = snakemake(
        "-n", "-p", "--cores", "1", "--config", "scale=paper", "--", "results/paper/data/ade20k.ok"
    )
    assert "hcformer check-data --scale paper --dataset ade20k" in out.stdout, out.stderr[-2000:]
    out = snakemake(
        "-n",
        "-p",
        "--cores",
        "1",
        "--config",
        "scale=paper",
        "--",
        "results/paper/data/ade20k.prepared",
    )
    assert (
        "hcformer prepare-data --dataset ade20k --root datasets/ADEChallengeData2016" in out.stdout
    )

    base = tmp_path / "datasets" / "ADEChallengeData2016"
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HCFORMER_WEIGHTS": str(tmp_path / "weights"),
    }
    cmd = [sys.executable, "-m", "hcformer.cli", "check-data", "--scale", "paper"]
    cmd += ["--dataset", "ade20k"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "missing datasets/ADEChallengeData2016/images/training" in out.stderr
    assert "unzip -q ADEChallengeData2016.zip -d datasets" in out.stderr
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        (base / "images" / split / "ADE_x_1.jpg").write_bytes(b"")
        (base / "annotations" / split / "ADE_x_1.png").write_bytes(b"")
    (tmp_path / "hub" / "models--timm--resnet50.tv_in1k").mkdir(parents=True)  # in the cache
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "resnet50.tv_in1k" not in out.stderr
    assert f"missing {tmp_path}/weights/resnet101.tv_in1k.safetensors (pretrained" in out.stderr
    assert out.stderr.endswith(f"make it with: hcformer fetch-weights --dir {tmp_path}/weights\n")
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in (
        "resnet101.tv_in1k",
        "swin_small_patch4_window7_224.ms_in1k",
        "swin_large_patch4_window12_384.ms_in22k",
    ):
        (weights / f"{name}.safetensors").write_bytes(b"")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _files(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_snapshot_target_reads_the_run_folders_and_submits_nothing(
    tmp_path, campaign_tree, pq_cells, table5_experiments
):
    """`snakemake snapshot` depends on no run: a dry run plans it alone, it runs beside a
    campaign's Snakemake (whose lock covers every run and table file), builds every table from
    a tree of done, failed, running and missing runs (failed cells marked), and a second call
    after one more run finishes takes that run in."""
    results = tmp_path / "results"
    root = results / "smoke"
    tree = campaign_tree(root)
    config = ("--config", f"results={results}")
    dry = snakemake("-n", "-p", "--cores", "1", "snapshot", *config)
    assert dry.returncode == 0, dry.stderr[-3000:]
    text = dry.stdout + dry.stderr
    assert job_counts(text) == Counter({"snapshot": 1, "total": 1}) and "hcformer run" not in text
    assert f"--snapshot {root}/snapshot" in text

    runs = [f"{root}/runs/{e}/seed{s}/metrics.json" for e in all_experiments("smoke")
            for s in (0, 1, 2)]  # fmt: skip
    held = runs + [f"{root}/tables/{t.id}.tex" for t in load_tables()] + [f"{root}/mlflow.ready"]
    locks = WORK / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text("\n".join(held) + "\n")
    (locks / "0.input.lock").write_text(f"{root}/data/coco_panoptic.ok\n")
    before = _files(root / "runs")
    try:
        refused = snakemake("--cores", "1", *config, "--", f"{root}/mlflow.ready")
        assert "Directory cannot be locked" in refused.stdout + refused.stderr  # a real lock
        out = snakemake("--cores", "1", "snapshot", *config)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "rule run:" not in out.stdout + out.stderr
        assert (locks / "0.output.lock").read_text().split() == held  # the campaign's lock stays
        assert _files(root / "runs") == before  # no run folder touched
        assert not (root / "mlflow.ready").exists() and not (root / "tables").exists()
        assert not (root / "mlflow.db").exists()  # the store is read if it exists, never made
        snap = root / "snapshot"
        for name in ("README.md", "macros.tex", "runs.csv", "figures/table5.pdf"):
            assert (snap / name).is_file(), name
        assert (snap / "tables.pdf").is_file() == (shutil.which("pdflatex") is not None)
        for table in load_tables():
            assert (snap / "tables" / f"{table.id}.tex").is_file()
            assert (snap / "provenance" / f"{table.id}.json").is_file()
        labels = [row.label for row in load_table("table5").rows]
        cells = pq_cells(snap / "aggregate" / "table5.csv")
        assert [cells[label]["status"] for label in labels] == [
            "partial", "running", "failed", "missing",
        ]  # fmt: skip
        assert cells[labels[0]]["ours"] == 42.0
        assert "\\textit{failed}" in (snap / "tables" / "table5.tex").read_text()

        (tree["running"] / "metrics.json").write_text('{"pq": 50.0}')
        out = snakemake("--cores", "1", "snapshot", *config)
        assert out.returncode == 0, out.stderr[-3000:]
        cells = pq_cells(snap / "aggregate" / "table5.csv")
        assert (cells[labels[1]]["status"], cells[labels[1]]["ours"]) == ("partial", 50.0)
        assert table5_experiments[1] in (snap / "runs.csv").read_text()
    finally:
        for name in ("0.output.lock", "0.input.lock"):
            (locks / name).unlink(missing_ok=True)


@pytest.mark.slow
def test_a_failed_job_leaves_a_snapshot_of_every_table(tmp_path, campaign_tree, pq_cells):
    """A workflow with runs to do that ends with a failed job (here the paper scale's input
    check, before anything is submitted) makes a snapshot on its way out, and still fails."""
    results = tmp_path / "results"
    campaign_tree(results / "paper")
    target = f"{results}/paper/runs/ade20k/hcformer-r50-L3-D8-Q100/seed0/metrics.json"
    out = snakemake("--cores", "1", "--config", "scale=paper", f"results={results}", "--", target)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Error in rule data" in text
    snap = results / "paper" / "snapshot"
    assert f"(failed cells marked): {snap}/README.md" in text
    cells = pq_cells(snap / "aggregate" / "table5.csv")
    label = load_table("table5").rows[2].label
    assert cells[label]["status"] == "failed"
    assert "A snapshot of the campaign" in (snap / "README.md").read_text()
