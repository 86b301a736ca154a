"""Does the tiny scale learn? Median of 3 seeds of train + evaluate on synthetic data.

    python benchmarks/tiny_training.py [--experiment ID ...] [--seeds 0 1 2] [--threads 2]
                                       [--set key=value ...] [--out benchmarks/out/tiny_training.json]

Each (experiment, seed) runs ``hcformer train`` then ``hcformer evaluate`` as fresh processes with
``OMP_NUM_THREADS=--threads`` in a temporary run folder; the script records, per run, the metrics
of ``metrics.json``, the training iterations, the wall seconds of the training process (start-up
included; noisy on a shared machine) and its CPU seconds (getrusage of the child; at 2 threads
about 1.9x the wall seconds), then the median over seeds per experiment. Writes JSON and prints
one readable line per experiment. The tiny scale's targets: mIoU >= 60 (ADE20K format), PQ >=
40 (COCO panoptic format) within 90 s per run on 2 threads (read as wall time: a thread count bounds
time, not CPU seconds; docs/tiny-scale.md gives both).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_EXPERIMENTS = ["ade20k/hcformer-r50-L3-D8-Q100", "coco_panoptic/hcformer-r50-L3-D8-Q100"]
HEADLINE = {"ade20k": "miou", "cityscapes": "miou", "coco_panoptic": "pq", "coco_instance": "ap"}


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; returns (CPU seconds, wall seconds); raises with its output on failure."""
    cpu, wall = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return child_cpu() - cpu, time.perf_counter() - wall


def one_run(exp: str, seed: int, args, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    run_dir = workdir / exp.replace("/", "__") / f"seed{seed}"
    overrides = [x for s in ["tracking.enabled=false", *args.set] for x in ("--set", s)]
    base = [sys.executable, "-m", "hcformer.cli"]
    train_cmd = [*base, "train", "--experiment", exp, "--scale", args.scale, "--seed", str(seed)]
    train_cpu, train_wall = run(
        [*train_cmd, "--run-dir", str(run_dir), "--no-progress", *overrides], env
    )
    eval_cpu, eval_wall = run([*base, "evaluate", "--run-dir", str(run_dir)], env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {
        "seed": seed,
        "metrics": metrics,
        "iterations": metrics.get("iterations"),
        "train_cpu_s": round(train_cpu, 1),
        "train_wall_s": round(train_wall, 1),
        "train_loop_wall_s": log[-1]["time"] if log else None,
        "eval_cpu_s": round(eval_cpu, 1),
        "eval_wall_s": round(eval_wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", nargs="+", default=DEFAULT_EXPERIMENTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--workdir", default=None, help="keep the run folders here (default: a temp dir)"
    )
    p.add_argument("--out", default="benchmarks/out/tiny_training.json")
    args = p.parse_args()
    results = {
        "scale": args.scale,
        "threads": args.threads,
        "overrides": args.set,
        "experiments": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for exp in args.experiment:
            runs = [one_run(exp, seed, args, workdir) for seed in args.seeds]
            dataset = exp.split("/")[0]
            key = HEADLINE.get(dataset, "miou")
            summary = {
                "metric": key,
                "median": statistics.median(r["metrics"][key] for r in runs),
                "median_train_cpu_s": statistics.median(r["train_cpu_s"] for r in runs),
                "median_train_wall_s": statistics.median(r["train_wall_s"] for r in runs),
                "useg": {
                    k: statistics.median(r["metrics"][k] for r in runs)
                    for k in sorted(runs[0]["metrics"])
                    if k.startswith("useg_level")
                },
                "runs": runs,
            }
            results["experiments"][exp] = summary
            print(
                f"{exp}: {key} median {summary['median']:.1f} over seeds {args.seeds} "
                f"({[round(r['metrics'][key], 1) for r in runs]}), {runs[0]['iterations']} iterations, "
                f"train {summary['median_train_cpu_s']:.0f} CPU-s / {summary['median_train_wall_s']:.0f} wall-s "
                f"at {args.threads} threads",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
