"""What one training step of a tiny model costs on CPU, and what the CPU fast paths save.

    python benchmarks/train_step.py [--experiment ID] [--scale tiny] [--threads 2] [--steps 8]
                                    [--out benchmarks/out/train_step.json]

Builds the trainer of ``--experiment`` at ``--scale`` (synthetic data is written on first use)
and times full training steps (data, forward, loss, backward, AdamW) in ONE process under six
variants, interleaved round by round so that load on a shared machine hits them alike:

- ``fast``: the code as it runs (DCNv2 as ``grid_sample`` + one matrix product on CPU, the
  eq. (5) backward on the live channels only);
- ``torchvision_dcn``: DCNv2 through ``torchvision.ops.deform_conv2d``'s CPU kernel instead;
- ``broadcast_matmul_dcn``: DCNv2's channel-and-tap contraction as ``torch.matmul``'s broadcast
  instead of ``torch.bmm`` (``hcformer.models.dcn.contract_taps``);
- ``dense_decode_backward``: the eq. (5) backward over every channel, as if every query's mask
  had a loss;
- ``level_by_level_decode``: every prediction set's masks decoded level by level even when the
  coarse map is small (``decode_masks`` otherwise decodes its cells' one-hot maps and mixes them);
- ``dense_training_masks``: every prediction set's stride-4 masks formed for every query (one-hot
  basis and one product) before the loss, instead of handing the loss the coefficients over the
  basis (it then forms only the matched masks).

Each variant keeps its own model and optimiser from the same initial state, so all six see the
same batches. Writes JSON (per-step wall and CPU seconds, medians, and each variant's ratio to
``fast``: the median over rounds of the ratio within a round) and prints one readable line per
variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def variant(name: str):
    """Switch the CPU fast path that ``name`` turns off (restored on exit)."""
    import torch
    from torchvision.ops import deform_conv2d

    from hcformer.models import clustering, dcn
    from hcformer.models.hcformer import HCFormer
    from hcformer.ops import fast

    saved = (
        dcn.sampled_deform_conv2d,
        dcn.contract_taps,
        fast.SPARSE_BACKWARD_BELOW,
        clustering.BASIS_DECODE_MAX_CELLS,
        HCFormer.factorised_training_masks,
    )
    if name == "torchvision_dcn":
        dcn.sampled_deform_conv2d = deform_conv2d
    elif name == "broadcast_matmul_dcn":
        dcn.contract_taps = torch.matmul
    elif name == "dense_decode_backward":
        fast.SPARSE_BACKWARD_BELOW = 0.0
    elif name == "level_by_level_decode":
        clustering.BASIS_DECODE_MAX_CELLS = 0
    elif name == "dense_training_masks":
        HCFormer.factorised_training_masks = False
    try:
        yield
    finally:
        (
            dcn.sampled_deform_conv2d,
            dcn.contract_taps,
            fast.SPARSE_BACKWARD_BELOW,
            clustering.BASIS_DECODE_MAX_CELLS,
            HCFormer.factorised_training_masks,
        ) = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="ade20k/hcformer-r50-L3-D8-Q100")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up)")
    p.add_argument("--out", default="benchmarks/out/train_step.json")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from hcformer.engine.train import Trainer
    from hcformer.launch.create import resolve_run

    cfg, info = resolve_run(
        experiment=args.experiment,
        config_file=None,
        scale=args.scale,
        seed=0,
        overrides=["tracking.enabled=false"],
    )
    names = [
        "fast",
        "torchvision_dcn",
        "broadcast_matmul_dcn",
        "dense_decode_backward",
        "level_by_level_decode",
        "dense_training_masks",
    ]
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            trainers[name] = Trainer(cfg, Path(tmp) / name, seed=0, info=info)
            trainers[name].setup()
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for step in range(2 + args.steps):
            for name in names:
                with variant(name):
                    cpu, wall = time.process_time(), time.perf_counter()
                    trainers[name].step()
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if step >= 2:
                    samples[name].append((wall, cpu))
    result = {
        "experiment": args.experiment,
        "scale": args.scale,
        "threads": args.threads,
        "batch_size": cfg.solver.batch_size,
        "steps": args.steps,
        "load_average": os.getloadavg(),
        "variants": {},
    }
    for name in names:
        wall = statistics.median(w for w, _ in samples[name])
        cpu = statistics.median(c for _, c in samples[name])
        # The ratio within each round (the variants ran back to back), then the median over
        # rounds: a change of load between rounds does not enter it.
        ratio = statistics.median(
            w / f for (w, _), (f, _) in zip(samples[name], samples["fast"], strict=True)
        )
        result["variants"][name] = {
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "wall_vs_fast": round(ratio, 2),
            "samples": samples[name],
        }
        print(
            f"{name:22s} {1000 * wall:7.0f} ms/step wall, {1000 * cpu:7.0f} ms CPU "
            f"({ratio:.2f}x fast, median of rounds) at {args.threads} threads, "
            f"batch {cfg.solver.batch_size}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
