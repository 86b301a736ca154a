"""Speed and peak memory of eq. (3) + eq. (5): the fast path against the appendix-C listings.

One run measures both implementations of ``clustering`` followed by ``decode`` (as the model uses
them at the stride-4 level) at the stride-4 map of an 800x1216 image: fine 200x304, coarse 100x152,
C_F = 128, batch 1, float32, 2 threads. Timings are interleaved (reference, fast, reference, ...)
and summarised by their median (wall clock and process CPU time); peak memory is measured in a fresh
subprocess per (implementation, mode) as the growth of the peak resident set size (ru_maxrss).
The machine is shared, so the ratios are what count.

    python benchmarks/ops_speed.py [--out benchmarks/out/ops_speed.json] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("reference", "fast")


def _inputs(args: argparse.Namespace, requires_grad: bool):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    h, w = args.height, args.width
    feat = F.normalize(torch.randn(1, args.channels, h, w, generator=g), dim=1)
    coarse = F.normalize(torch.randn(1, args.channels, h // 2, w // 2, generator=g), dim=1)
    if args.features_layout == "channels_last":  # what ClusteringModule.embed gives
        feat = feat.contiguous(memory_format=torch.channels_last)
        coarse = coarse.contiguous(memory_format=torch.channels_last)
    masks = torch.randn(1, args.decode_channels, h // 2, w // 2, generator=g)
    scale = torch.tensor(0.1)
    tensors = [feat, coarse, scale, masks]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def _step(impl, feat, coarse, scale, masks, backward: bool):
    assignment = impl.clustering(feat, coarse, scale)
    out = impl.decode(masks, assignment)
    if backward:
        out.backward(out.new_ones(out.shape))
    return out


def _module(name: str):
    from hcformer.ops import fast, reference

    return {"reference": reference, "fast": fast}[name]


def _child_memory(args: argparse.Namespace) -> None:
    """Run one step of one implementation and print the peak RSS growth (MiB) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    impl = _module(args.child)
    backward = args.mode == "train"
    # warm up kernels and thread pools on a tiny case so that only the big step is measured
    small = argparse.Namespace(**{**vars(args), "height": 8, "width": 8})
    _step(impl, *_inputs(small, backward), backward=backward)
    tensors = _inputs(args, backward)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.set_grad_enabled(backward):
        _step(impl, *tensors, backward=backward)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024.0}))  # ru_maxrss is in KiB on Linux


def _memory(args: argparse.Namespace, impl: str, mode: str) -> float:
    cmd = [sys.executable, __file__, "--child", impl, "--mode", mode]
    for key in ("height", "width", "channels", "decode_channels", "threads", "features_layout"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess {cmd} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def _timings(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    feat, coarse, scale, masks = _inputs(args, requires_grad=True)
    impls = {name: _module(name) for name in IMPLS}
    # agreement of the two paths on this input (forward values and gradients)
    results = {}
    for name, impl in impls.items():
        for t in (feat, coarse, scale, masks):
            t.grad = None
        out = _step(impl, feat, coarse, scale, masks, backward=True)
        results[name] = [out.detach(), feat.grad, coarse.grad, scale.grad, masks.grad]
    names = ("decoded", "d_feat", "d_coarse", "d_scale", "d_masks")
    rel_diff = {
        name: ((a - b).abs().max() / b.abs().max()).item()
        for name, a, b in zip(names, results["fast"], results["reference"])
    }
    samples: dict[str, dict[str, list[float]]] = {
        f"{name}/{phase}/{clock}": []
        for name in IMPLS
        for phase in ("forward", "forward_backward")
        for clock in ("wall", "cpu")
    }
    for _ in range(args.repeats):
        for name, impl in impls.items():
            for phase, backward in (("forward", False), ("forward_backward", True)):
                for t in (feat, coarse, scale, masks):
                    t.grad = None
                wall, cpu = time.perf_counter(), time.process_time()
                _step(impl, feat, coarse, scale, masks, backward=backward)
                samples[f"{name}/{phase}/wall"].append(time.perf_counter() - wall)
                samples[f"{name}/{phase}/cpu"].append(time.process_time() - cpu)
    return {"rel_diff": rel_diff, "samples_s": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out/ops_speed.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--height", type=int, default=200, help="fine map height (stride 4)")
    parser.add_argument("--width", type=int, default=304, help="fine map width (stride 4)")
    parser.add_argument("--channels", type=int, default=128, help="C_F of the clustering module")
    parser.add_argument(
        "--decode-channels", type=int, default=100, help="channels decoded (the model's queries)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--features-layout",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="memory format of the clustering features (the module's LayerNorm gives channels-last)",
    )
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("inference", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_memory(args)
        return 0

    load_before = os.getloadavg()
    memory = {
        f"{name}/{mode}": _memory(args, name, mode)
        for mode in ("inference", "train")
        for name in IMPLS
    }
    timing = _timings(args)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in timing["samples_s"].items()}
    ratios = {
        f"speedup/{phase}/{clock}": med[f"reference/{phase}/{clock}"] / med[f"fast/{phase}/{clock}"]
        for phase in ("forward", "forward_backward")
        for clock in ("wall", "cpu")
    }
    ratios.update(
        {
            f"memory_fast_over_reference/{mode}": memory[f"fast/{mode}"]
            / memory[f"reference/{mode}"]
            for mode in ("inference", "train")
        }
    )
    import torch

    report = {
        "config": {
            "fine": [1, args.channels, args.height, args.width],
            "coarse": [1, args.channels, args.height // 2, args.width // 2],
            "decoded": [1, args.decode_channels, args.height, args.width],
            "dtype": "float32",
            "features_layout": args.features_layout,
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "max_rel_diff_fast_vs_reference": timing["rel_diff"],
        "median_s": med,
        "min_s": {k: min(v) for k, v in timing["samples_s"].items()},
        "peak_mib": memory,
        "ratios": ratios,
        "samples_s": timing["samples_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "ops_speed: fast vs appendix-C listing, clustering+decode at "
        f"{args.height}x{args.width}, C_F={args.channels}, {args.threads} threads: "
        f"forward {ratios['speedup/forward/wall']:.1f}x "
        f"(cpu {ratios['speedup/forward/cpu']:.1f}x), "
        f"forward+backward {ratios['speedup/forward_backward/wall']:.1f}x "
        f"(cpu {ratios['speedup/forward_backward/cpu']:.1f}x) faster; peak memory "
        f"inference {memory['fast/inference']:.0f} vs {memory['reference/inference']:.0f} MiB, "
        f"train {memory['fast/train']:.0f} vs {memory['reference/train']:.0f} MiB; "
        f"max relative diff {max(timing['rel_diff'].values()):.1e}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
