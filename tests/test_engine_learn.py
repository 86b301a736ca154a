"""The tiny scale learns: the tiny HCFormer R50 with the recipe the tiny tables train
(``experiments/scales/tiny.yaml``: 192x192 synthetic ADE20K-format data whose classes share
colours and differ by texture or shape, 100 queries, 8 decoder layers, 300 iterations of 6
images), one seed, through ``train`` and ``evaluate``.

The tiny scale's bar (docs/tiny-scale.md: mIoU >= 60 as the median of three seeds on 2
threads) is measured by ``benchmarks/tiny_training.py``: seeds 0-5 on 2 threads 70.1 / 48.3 / 69.8 / 70.2 / 56.4 / 68.8;
seeds 0-2 on one thread (tiny table V's L3 row) 75.6 / 32.9 / 69.6. Which seeds split the colour
pairs depends on float rounding (thread count, CPU), so one seed's score on another machine is a
draw from that spread: the test's bar sits under every run measured and far above a model that
does not learn (the untrained model scores about 5; masks upsampled from the 6x6 map without
the clustering hierarchy, tiny table V's L0 row, 14.7-28.9).
"""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from hcformer.engine.evaluate import evaluate
from hcformer.engine.train import train
from hcformer.launch.create import create_run

EXPERIMENT = "ade20k/hcformer-r50-L3-D8-Q100"
MIOU_BAR = 30.0  # percent


@pytest.mark.slow
def test_tiny_scale_learns_synthetic_ade20k(tmp_path):
    # Threads as the environment gives them (2 on the CI machine).
    run = create_run(
        tmp_path / "run",
        experiment=EXPERIMENT,
        scale="tiny",
        seed=0,
        overrides=[f"data.root={tmp_path / 'ade20k'}", "tracking.enabled=false"],
    )
    solver = yaml.safe_load((run / "config.yaml").read_text())["solver"]
    assert solver["iterations"] == 300 and solver["batch_size"] == 6  # the tiny recipe
    cpu, wall = time.process_time(), time.perf_counter()
    result = train(run, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert result.finished and result.iteration == 300
    metrics = evaluate(run)
    print(
        f"tiny scale: miou {metrics['miou']:.1f} after {result.iteration} it, "
        f"{cpu:.0f} CPU-s, {wall:.0f} s at {torch.get_num_threads()} threads"
    )
    assert metrics["miou"] >= MIOU_BAR, metrics
