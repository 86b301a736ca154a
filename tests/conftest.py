"""Fixtures shared by several test modules (no test module imports another).

Stand-in run folders for the analysis commands (``hcformer aggregate``, ``tables``, ``figures``,
``snakemake snapshot``): ``write_run``, ``fill_table``, ``aggregate``, ``paper_values``,
``campaign_tree``, ``pq_cells``, ``table5_experiments``. A stand-in engine for the launchers
(``hcformer run --engine``): ``write_fake_engine``. The loss with the paper's weights:
``make_criterion``. The engine tests' few-channel HCFormer on synthetic ADE20K: ``tiny_ade20k``.

Each fixture hands out a plain function and holds no state, so they are session-scoped and
module-scoped fixtures may use them. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Run folders for the analysis commands


def _paper_values(table_id: str) -> dict[str, dict]:
    data = yaml.safe_load((ROOT / "experiments" / "paper_values.yaml").read_text())
    return {row["label"]: row for row in data["tables"][table_id]["rows"]}


def _write_run(results: Path, exp: str, seed: int, metrics: dict | None, **info) -> Path:
    run = results / "runs" / exp / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": exp.split("/")[0]}}))
    (run / "run.json").write_text(
        json.dumps(
            {"exp_id": exp, "seed": seed, "scale": "smoke", "git_commit": f"c{seed}" * 5, **info}
        )
    )
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _fill_table(results: Path, table_id: str, value, skip=(), seeds=(0, 1, 2)) -> dict:
    from hcformer.experiments import load_table

    table = load_table(table_id)
    written = {}
    for row in table.rows:
        for run in row.runs:
            if run.experiment_id in skip:
                continue
            for seed in seeds:
                metrics = value(run.experiment_id, seed)
                _write_run(results, run.experiment_id, seed, metrics)
                written[(run.experiment_id, seed)] = metrics
    return written


def _aggregate(results: Path, table: str, *extra: str) -> list[dict]:
    from hcformer import cli
    from hcformer.analysis.aggregate import read_cells

    out = results / "aggregate" / f"{table}.csv"
    argv = ["aggregate", "--results", str(results), "--scale", "smoke", "--table", table]
    assert cli.main([*argv, "--out", str(out), *extra]) == 0
    return read_cells(out)


def _table5_experiments() -> list[str]:
    from hcformer.experiments import load_table

    return [row.runs[0].experiment_id for row in load_table("table5").rows]


def _campaign_tree(results: Path) -> dict[str, Path]:
    table5 = _table5_experiments()
    for seed, pq in ((0, 40.0), (1, 44.0)):
        _write_run(results, table5[0], seed, {"pq": pq})
    failed = {}
    for exp, seed in ((table5[0], 2), (table5[2], 0)):
        run = _write_run(results, exp, seed, None)
        (run / "job.json").write_text(json.dumps({"state": "failed", "launcher": "inline"}))
        log = results / "logs" / "run" / exp / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("hcformer train: it 4/6\nhcformer run: error: loss_dice is nan\n")
        failed[exp] = run
    run = _write_run(results, table5[1], 0, None)
    job = {"state": "running", "launcher": "inline", "pid": os.getpid()}
    (run / "job.json").write_text(json.dumps({**job, "host": socket.gethostname()}))
    return {"running": run, **failed}


def _pq_cells(path: Path) -> dict[str, dict]:
    from hcformer.analysis.aggregate import read_cells

    return {c["row"]: c for c in read_cells(path) if c["column"] == "pq"}


@pytest.fixture(scope="session")
def paper_values() -> Callable[[str], dict[str, dict]]:
    """``paper_values(table_id)``: the paper's row values of a table, by row label, read
    straight from experiments/paper_values.yaml (an independent reference for the tables)."""
    return _paper_values


@pytest.fixture(scope="session")
def write_run() -> Callable[..., Path]:
    """``write_run(results, exp, seed, metrics, **run_json)``: a stand-in run folder under
    ``results/runs/<exp>/seed<k>/``: ``config.yaml``, ``run.json`` (git commit ``c<k>`` x 5 plus
    ``run_json``) and, unless ``metrics`` is None, ``metrics.json``. Returns the folder."""
    return _write_run


@pytest.fixture(scope="session")
def fill_table() -> Callable[..., dict]:
    """``fill_table(results, table_id, value, skip=(), seeds=(0, 1, 2))``: a run folder for every
    experiment of a table (those in ``skip`` left out) and seed; ``value(exp, seed)`` gives the
    metrics (None: no ``metrics.json``). Returns ``{(exp, seed): metrics}``."""
    return _fill_table


@pytest.fixture(scope="session")
def aggregate() -> Callable[..., list[dict]]:
    """``aggregate(results, table, *extra_args)``: ``hcformer aggregate`` at smoke scale into
    ``results/aggregate/<table>.csv`` (asserts exit 0); returns the cells read back."""
    return _aggregate


@pytest.fixture(scope="session")
def table5_experiments() -> list[str]:
    """The experiment ids of table 5's rows, in order: L0, L1, L2, L3."""
    return _table5_experiments()


@pytest.fixture(scope="session")
def campaign_tree() -> Callable[[Path], dict[str, Path]]:
    """``campaign_tree(results)``: table 5 mid-campaign. L0 seeds 0 and 1 done (pq 40, 44), seed 2
    failed (``job.json`` says so, its log says why); L1 seed 0 running (its local process is this
    one), seeds 1-2 not started; L2 seed 0 failed, seeds 1-2 not started; L3 not started.
    Returns ``{"running": L1 seed 0's folder, <L0 id>: L0 seed 2's, <L2 id>: L2 seed 0's}``."""
    return _campaign_tree


@pytest.fixture(scope="session")
def pq_cells() -> Callable[[Path], dict[str, dict]]:
    """``pq_cells(csv_path)``: the ``pq`` cells of an aggregate CSV, by row label."""
    return _pq_cells


# --------------------------------------------------------------------------------------
# A stand-in engine for ``hcformer run --engine``

_TRAIN = """
import json, os, signal, sys, threading, time
from pathlib import Path
import yaml
from . import signals

class Result:
    def __init__(self, exit_code):
        self.exit_code = exit_code

def train(run_dir, progress=True):
    run = Path(run_dir); (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    total = int(yaml.safe_load((run / "config.yaml").read_text())["solver"]["iterations"])
    with open(run / "starts.txt", "a") as fh:
        fh.write(f"{os.getpid()} {os.environ.get('SLURM_RESTART_COUNT', '-')}\\n")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: signals.request_stop())
    if os.environ.get("FAKE_ENGINE_FAIL") == "1":
        print("fake-engine: boom, a clear failure", file=sys.stderr)
        return Result(3)
    last = run / "checkpoints" / "last.pt"
    it = int(last.read_text()) if last.exists() else 0
    while it < total:
        time.sleep(float(os.environ.get("FAKE_ENGINE_SLEEP", 0)))
        it += 1
        tmp = last.with_suffix(".tmp"); tmp.write_text(str(it)); os.replace(tmp, last)
        with open(run / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps({"iteration": it}) + "\\n")
        if signals.stop_requested() and it < total:
            return Result(143)
    return Result(0)
"""

_EVALUATE = """
import json, os
from pathlib import Path

def evaluate(run_dir, **options):
    run = Path(run_dir)
    it = int((run / "checkpoints" / "last.pt").read_text())
    seed = json.loads((run / "run.json").read_text())["seed"]
    metrics = {"miou": 40.0 + seed, "pixel_acc": 80.0, "iterations": it}
    tmp = run / ".metrics.tmp"
    tmp.write_text(json.dumps(metrics))
    os.replace(tmp, run / "metrics.json")
    return metrics
"""

_SIGNALS = """
import threading
_STOP = threading.Event()

def request_stop():
    _STOP.set()

def stop_requested():
    return _STOP.is_set()
"""


def _write_fake_engine(root: Path) -> str:
    pkg = Path(root) / "fakeengine"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name, text in (("train", _TRAIN), ("evaluate", _EVALUATE), ("signals", _SIGNALS)):
        (pkg / f"{name}.py").write_text(textwrap.dedent(text))
    return "fakeengine"


@pytest.fixture(scope="session")
def write_fake_engine() -> Callable[[Path], str]:
    """``write_fake_engine(dir)``: write the package ``fakeengine`` (train, evaluate, signals)
    into ``dir``; returns its name (for ``hcformer run --engine``).

    Its ``train(run_dir)`` reads the created folder's ``config.yaml``, counts its
    ``solver.iterations`` into ``checkpoints/last.pt`` (a text file), resumes from it, sleeps
    ``$FAKE_ENGINE_SLEEP`` seconds an iteration, stops at the next iteration boundary when asked
    (``signals.request_stop()`` or SIGTERM, exit code 143) and fails when ``$FAKE_ENGINE_FAIL``
    is 1 (exit code 3); ``evaluate(run_dir)`` writes ``metrics.json`` (miou 40 + the seed of
    ``run.json``). Every start of train appends a line ``<pid> <SLURM_RESTART_COUNT or ->`` to
    ``starts.txt`` in the run folder."""
    return _write_fake_engine


# --------------------------------------------------------------------------------------
# A model the engine trains in seconds


def _tiny_ade20k(root: Path, level: int = 3, **sections: dict) -> dict:
    """A few-channel HCFormer-R50 (DCNv2, ``level`` clustering modules, 6 queries, 2 decoder
    layers) on synthetic ADE20K at ``root`` (4 + 2 images of 64x64, scale-and-crop to 64x64,
    made in the training process), tracking off; ``sections`` merged over it
    (``hcformer.config.merge``). A dict for ``build_config``."""
    from hcformer.config import merge

    base = {
        "model": {
            "num_classes": 8,
            "backbone": {
                "name": "resnet50",
                "hierarchy_level": level,
                "dcnv2": True,
                "cluster_dim": 16,
                "depths": [1, 1, 1, 1],
                "widths": [8, 16, 32, 64],
                "stem_width": 8,
            },
            "head": {
                "queries": 6,
                "decoder_layers": 2,
                "hidden_dim": 32,
                "nheads": 4,
                "dim_feedforward": 64,
                "mask_dim": 32,
            },
        },
        "data": {
            "dataset": "ade20k",
            "task": "semantic",
            "root": str(root),
            "synthetic": {"train_images": 4, "val_images": 2, "size": [64, 64], "seed": 0},
            "train_split": "training",
            "val_split": "validation",
            "augmentation": "scale_crop",
            "scale_range": [0.5, 2.0],
            "crop": [64, 64],
            "num_workers": 0,
        },
        "tracking": {"enabled": False},
    }
    return merge(base, sections)


@pytest.fixture(scope="session")
def tiny_ade20k() -> Callable[..., dict]:
    """``tiny_ade20k(root, level=3, **sections)``: the engine tests' config dict (see
    :func:`_tiny_ade20k`)."""
    return _tiny_ade20k


# --------------------------------------------------------------------------------------
# The loss


@pytest.fixture(scope="session")
def make_criterion() -> Callable[..., object]:
    """``make_criterion(num_classes=3, num_points=256, **overrides)``: a ``SetCriterion`` with
    the paper's weights (class 2, BCE 5, dice 5, no-object 0.1, regulariser 0.1) and point
    sampling (oversample 3, importance 0.75), its matcher sampling the same number of points."""
    from hcformer.losses import HungarianMatcher, SetCriterion

    def make(num_classes: int = 3, num_points: int = 256, **overrides) -> SetCriterion:
        matcher = HungarianMatcher(
            class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=num_points
        )
        args = dict(
            num_classes=num_classes,
            matcher=matcher,
            class_weight=2.0,
            mask_weight=5.0,
            dice_weight=5.0,
            no_object_weight=0.1,
            reg_weight=0.1,
            num_points=num_points,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
        )
        return SetCriterion(**{**args, **overrides})

    return make
