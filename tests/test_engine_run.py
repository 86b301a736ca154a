"""``hcformer train`` / ``hcformer evaluate`` as real processes on a tiny synthetic ADE20K:
resume after a real SIGTERM replays bit for bit, 2-process gloo DDP equals 1 process with the
same global batch, gradient accumulation equals one pass, and evaluation writes metrics.json,
predictions and the Fig. 5 data (with live MLflow logging)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

torch.set_num_threads(1)

ITERATIONS = 10


@pytest.fixture(scope="module")
def tiny_config(tiny_ade20k):
    """``tiny_config(root)``: the engine tests' tiny HCFormer on 12 + 4 images with colour
    jitter, ``ITERATIONS`` poly-decayed fp32 iterations of 2, a checkpoint every 2 (a dict)."""

    def make(root: Path) -> dict:
        return tiny_ade20k(
            root,
            data={
                "synthetic": {"train_images": 12, "val_images": 4},
                "color_jitter": True,
                "test_short": 64,
                "test_max": 64,
            },
            solver={
                "iterations": ITERATIONS,
                "batch_size": 2,
                "lr": 1e-3,
                "schedule": "poly",
                "clip_grad": 0.01,
                "amp": False,
                "checkpoint_every": 2,
                "log_every": 1,
            },
            loss={"num_points": 64},
            test={"batch_size": 2, "visual_images": 2},
        )

    return make


def hcformer(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        if not env or key not in env:
            full.pop(key, None)
    cmd = [sys.executable, "-m", "hcformer.cli", *args]
    return subprocess.Popen(
        cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_config) -> Path:
    work = tmp_path_factory.mktemp("engine")
    cfg = tiny_config(work / "data" / "ade20k")
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    tracked = dict(cfg, tracking={"enabled": True, "uri": f"sqlite:///{work / 'mlflow.db'}"})
    (work / "tracked.yaml").write_text(yaml.safe_dump(tracked))
    return work


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """One uninterrupted run on one process (with live MLflow logging)."""
    run = work / "runs" / "ref" / "seed0"
    code, out = finish(
        hcformer(
            "train", "--config", str(work / "tracked.yaml"), "--seed", "0", "--run-dir", str(run)
        )
    )
    assert code == 0, out
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pt", map_location="cpu", weights_only=True)


def train_argv(work: Path, run: Path, *extra: str) -> tuple[str, ...]:
    """``hcformer train`` of the tiny config, seed 0, into ``run``."""
    return (
        "train",
        "--config",
        str(work / "tiny.yaml"),
        "--seed",
        "0",
        "--run-dir",
        str(run),
        *extra,
    )


def wait_for_checkpoint(proc: subprocess.Popen, run: Path) -> Path:
    """``run``'s last.pt once the running ``proc`` has written it."""
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 180
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert last.exists(), finish(proc)[1]
    return last


@pytest.mark.slow
def test_sigterm_then_rerun_replays_bit_for_bit(work, reference):
    run = work / "runs" / "killed" / "seed0"
    argv = train_argv(work, run)
    proc = hcformer(*argv)
    last = wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out  # 128 + SIGTERM
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert 2 <= state["iteration"] < ITERATIONS
    assert not (run / "model_final.pt").exists()
    assert "rerun to resume" in out
    code, out = finish(hcformer(*argv))
    assert code == 0, out
    assert f"at iteration {state['iteration']}" in out
    ref, got = weights(reference), weights(run)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    # The log replays too: one line per iteration, the same losses.
    ref_log = [
        json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()
    ]
    got_log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in got_log] == list(range(1, ITERATIONS + 1))
    assert [e["loss"] for e in got_log] == [e["loss"] for e in ref_log]
    # A third run has nothing to do.
    code, out = finish(hcformer(*argv))
    assert code == 0 and "nothing to do" in out


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(work, reference):
    run = work / "runs" / "ddp" / "seed0"
    argv = train_argv(work, run, "--no-progress")
    common = {
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    procs = [
        hcformer(*argv, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)
    ]
    results = [finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out
    ref, got = weights(reference), weights(run)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-4, msg=key)
    ref_log = [
        json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()
    ]
    got_log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    # Logged losses are the global batch's (summed over the processes); the weights differ only
    # by float summation order, amplified a little by Adam's normalisation (~2e-5 measured).
    assert [e["loss"] for e in got_log] == pytest.approx([e["loss"] for e in ref_log], rel=1e-4)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_pass(work, reference):
    run = work / "runs" / "accum" / "seed0"
    argv = train_argv(work, run, "--set", "solver.micro_batch=1")
    code, out = finish(hcformer(*argv))
    assert code == 0, out
    ref, got = weights(reference), weights(run)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.slow
def test_evaluate_writes_metrics_predictions_visuals_and_mlflow(work, reference):
    code, out = finish(hcformer("evaluate", "--run-dir", str(reference)))
    assert code == 0, out
    metrics = json.loads((reference / "metrics.json").read_text())
    for key in ("miou", "pixel_acc", "useg_level1", "useg_level2", "useg_level3"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["iterations"] == ITERATIONS and metrics["images"] == 4
    preds = sorted(p.name for p in (reference / "predictions" / "semantic").iterdir())
    assert len(preds) == 4 and all(p.endswith(".png") for p in preds)
    visuals = sorted((reference / "visual").glob("*.npz"))
    assert len(visuals) == 2
    with np.load(visuals[0]) as v:
        h, w = v["image"].shape[:2]
        assert v["image"].dtype == np.uint8 and v["image"].shape == (h, w, 3)
        assert v["clusters"].shape == (3, h, w) and v["pred"].shape == (h, w) == v["gt"].shape
        assert v["stride"].tolist() == [16, 8, 4]
        assert v["pred"].max() < 8 and v["clusters"].max() < (64 // 32) ** 2
    # Live MLflow: one FINISHED run with params, tags, the losses per step and the final metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("hcformer/")]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["exp_id"] == "tracked" and run.data.tags["seed"] == "0"
    assert run.data.params["model.head.queries"] == "6"
    assert run.data.metrics["miou"] == pytest.approx(metrics["miou"])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, ITERATIONS + 1))


def test_benchmark_train_writes_timing_json(work, tmp_path):
    from hcformer.commands.benchmark_train import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "--config",
            str(work / "tiny.yaml"),
            "--iterations",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["amp"] is False and result["batch"] == 2
    assert result["input_size"] == [64, 64]
    assert result["seconds_per_iteration"] > 0
    assert result["images_per_second"] == pytest.approx(2 / result["seconds_per_iteration"])


def test_data_workers_make_the_same_batches_as_the_training_process(work, reference, tiny_config):
    """Samples are keyed by (seed, iteration, index): DataLoader workers prefetch exactly the
    batches the training process would make, in order, from any start."""
    from hcformer.config import build_config
    from hcformer.data import build_dataset
    from hcformer.engine.batches import TrainBatches, iterate

    cfg = build_config(tiny_config(work / "data" / "ade20k"))
    batches = TrainBatches(build_dataset(cfg.data, "train"), cfg, seed=3, passes=[[0], [1]])
    inline = list(iterate(batches, 6, num_workers=0))
    workers = list(iterate(batches, 6, num_workers=2))
    assert len(inline) == len(workers) == ITERATIONS - 6
    for want, got in zip(inline, workers, strict=True):
        assert [p[2] for p in got] == [[0], [1]]
        for (images_w, targets_w, _), (images_g, targets_g, _) in zip(want, got, strict=True):
            assert torch.equal(images_w, images_g)
            for tw, tg in zip(targets_w, targets_g, strict=True):
                assert tw.keys() == tg.keys() == {"labels", "masks", "sem_seg"}
                assert all(torch.equal(tw[k], tg[k]) for k in tw)
    # Different iterations, different batches (the key includes the iteration).
    assert not torch.equal(inline[0][0][0], inline[1][0][0])


@pytest.mark.slow
def test_workers_survive_a_group_sigterm_and_the_rerun_replays(work, reference):
    """SLURM signals every process of a job step: with data workers the training process
    still saves at an iteration boundary and exits 143, and the rerun ends bit for bit where
    the uninterrupted single-process run did."""
    run = work / "runs" / "workers" / "seed0"
    argv = train_argv(work, run, "--set", "data.num_workers=2")
    proc = hcformer(*argv, start_new_session=True)  # its own group: killpg spares pytest
    wait_for_checkpoint(proc, run)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out
    assert "rerun to resume" in out and "Traceback" not in out
    code, out = finish(hcformer(*argv))
    assert code == 0, out
    ref, got = weights(reference), weights(run)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
