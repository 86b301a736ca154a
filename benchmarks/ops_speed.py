"""Speed and peak memory of eq. (3) + eq. (5): the fast paths against the appendix-C listings.

One run measures every implementation of ``clustering`` followed by ``decode`` (as the model uses
them at the stride-4 level) at the stride-4 map of an 800x1216 image: fine 200x304, coarse 100x152,
C_F = 128, 100 decoded channels, batch 1, float32. Implementations: ``reference`` (the listings),
``fast`` (``hcformer.ops.fast`` with the batched-product backend) and, on CUDA where triton is
installed, ``triton`` (the Triton backend: eq. (3) as the fused ``hcformer::local_assignment``,
eq. (5) as ``local_decode``, each on Triton kernels; ``available_impls`` lists what runs on a
device, so a CPU run does not try it). Timings are interleaved
(reference, fast, triton, reference, ...) and summarised by their median: on the CPU wall clock
and process CPU time of one call (2 threads), on CUDA the wall time per call of ``--inner``
back-to-back calls between two synchronisations. Peak memory: on the CPU the growth of ru_maxrss
in a fresh subprocess per (implementation, mode), on CUDA the growth of max_memory_allocated.

The memory-bandwidth bound: the bytes each primitive must at least read and write (its inputs
once, its outputs once: forward similarity+softmax reads fine and coarse and writes the
assignment, decode reads x and the assignment and writes the decoded map; the backward of each
reads the upstream gradient and the forward inputs (eq. 3: also its saved output) and writes the
gradients) over the device's
bandwidth (``--bandwidth``, the H200's 4.8e12 B/s by default, or ``--measure-bandwidth``: a
large device-to-device copy); the report gives each implementation's time over that bound.

    python benchmarks/ops_speed.py [--out benchmarks/out/ops_speed.json] [--repeats 7] [--device cuda]
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

IMPLS = ("reference", "fast", "triton")  # "triton": CUDA only (see available_impls)
H200_BANDWIDTH = 4.8e12  # bytes per second (HBM3e)


def available_impls(device: str) -> tuple[str, ...]:
    """The implementations that run on ``device``: the Triton kernels need CUDA and triton."""
    if device.startswith("cuda"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return IMPLS[:2]
        return IMPLS
    return IMPLS[:2]


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
    from hcformer.ops import fast

    with fast.use_backend(getattr(impl, "backend", "auto")):  # the backward runs under it too
        assignment = impl.clustering(feat, coarse, scale)
        out = impl.decode(masks, assignment)
        if backward:
            out.backward(out.new_ones(out.shape))
    return out


def _module(name: str):
    """An object with ``clustering``, ``decode`` and the ``backend`` that ``_step`` forces."""
    from hcformer.ops import fast, reference

    module = {"reference": reference, "fast": fast, "triton": fast}[name]
    backend = {"reference": "auto", "fast": "torch", "triton": "triton"}[name]
    return argparse.Namespace(clustering=module.clustering, decode=module.decode, backend=backend)


def minimum_bytes(args: argparse.Namespace, itemsize: int = 4) -> dict[str, int]:
    """Bytes that clustering + decode must at least read and write, forward and backward.

    Each primitive reads each input and writes each output once (the scale is negligible). The
    backward of eq. (3) reads the upstream gradient, the saved assignment (the softmax backward
    needs it; recomputing it would read fine and coarse once more) and fine and coarse, and
    writes d fine and d coarse.
    """
    fine = args.channels * args.height * args.width
    coarse = fine // 4
    assignment = 9 * args.height * args.width
    x = args.decode_channels * args.height * args.width // 4
    decoded = 4 * x
    forward = (fine + coarse + assignment) + (x + assignment + decoded)
    backward = (decoded + x + assignment + x + assignment) + (
        assignment + assignment + fine + coarse + fine + coarse
    )
    return {
        "forward": forward * itemsize,
        "forward_backward": (forward + backward) * itemsize,
    }


def _measure_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), best of 10."""
    import torch

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


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


def _cuda_memory(args: argparse.Namespace, impl_name: str, backward: bool) -> float:
    """Growth of the CUDA allocator's peak (MiB) over one step of one implementation."""
    import torch

    impl = _module(impl_name)
    tensors = [t.detach().to(args.device).requires_grad_(backward) for t in _inputs(args, False)]
    torch.cuda.synchronize(args.device)
    torch.cuda.reset_peak_memory_stats(args.device)
    before = torch.cuda.memory_allocated(args.device)
    with torch.set_grad_enabled(backward):
        _step(impl, *tensors, backward=backward)
    torch.cuda.synchronize(args.device)
    return (torch.cuda.max_memory_allocated(args.device) - before) / 2**20


def _timings(args: argparse.Namespace, impls: tuple[str, ...]) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    feat, coarse, scale, masks = (
        t.detach().to(args.device).requires_grad_(True) for t in _inputs(args, False)
    )
    modules = {name: _module(name) for name in impls}
    # agreement of every path with the listing on this input (forward values and gradients)
    results = {}
    for name, impl in modules.items():
        for t in (feat, coarse, scale, masks):
            t.grad = None
        out = _step(impl, feat, coarse, scale, masks, backward=True)  # also warms up / compiles
        results[name] = [out.detach(), feat.grad, coarse.grad, scale.grad, masks.grad]
    names = ("decoded", "d_feat", "d_coarse", "d_scale", "d_masks")
    rel_diff = {
        impl: {
            name: ((a - b).abs().max() / b.abs().max()).item()
            for name, a, b in zip(names, results[impl], results["reference"])
        }
        for impl in impls
        if impl != "reference"
    }
    samples: dict[str, list[float]] = {
        f"{name}/{phase}/{clock}": []
        for name in impls
        for phase in ("forward", "forward_backward")
        for clock in (("wall",) if cuda else ("wall", "cpu"))
    }
    inner = args.inner if cuda else 1
    for _ in range(args.repeats):
        for name, impl in modules.items():
            for phase, backward in (("forward", False), ("forward_backward", True)):
                if cuda:
                    torch.cuda.synchronize(args.device)
                wall, cpu = time.perf_counter(), time.process_time()
                with torch.set_grad_enabled(backward):
                    for _ in range(inner):
                        for t in (feat, coarse, scale, masks):
                            t.grad = None
                        _step(impl, feat, coarse, scale, masks, backward=backward)
                if cuda:
                    torch.cuda.synchronize(args.device)
                samples[f"{name}/{phase}/wall"].append((time.perf_counter() - wall) / inner)
                if not cuda:
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
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if any)")
    parser.add_argument("--inner", type=int, default=20, help="CUDA: calls per timed sample")
    parser.add_argument(
        "--bandwidth", type=float, default=H200_BANDWIDTH, help="device bandwidth, bytes/s"
    )
    parser.add_argument(
        "--measure-bandwidth", action="store_true", help="CUDA: measure it with a 1 GiB copy"
    )
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("inference", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_memory(args)
        return 0
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    impls = available_impls(args.device)

    load_before = os.getloadavg()
    if cuda:
        memory = {
            f"{name}/{mode}": _cuda_memory(args, name, mode == "train")
            for mode in ("inference", "train")
            for name in impls
        }
    else:
        memory = {
            f"{name}/{mode}": _memory(args, name, mode)
            for mode in ("inference", "train")
            for name in impls
        }
    timing = _timings(args, impls)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in timing["samples_s"].items()}
    phases = ("forward", "forward_backward")
    clocks = ("wall",) if cuda else ("wall", "cpu")
    ratios = {
        f"speedup/{name}/{phase}/{clock}": med[f"reference/{phase}/{clock}"]
        / med[f"{name}/{phase}/{clock}"]
        for name in impls[1:]
        for phase in phases
        for clock in clocks
    }
    ratios.update(
        {
            f"memory_{name}_over_reference/{mode}": memory[f"{name}/{mode}"]
            / max(memory[f"reference/{mode}"], 1e-9)
            for name in impls[1:]
            for mode in ("inference", "train")
        }
    )
    bandwidth = _measure_bandwidth(args.device) if cuda and args.measure_bandwidth else None
    bandwidth_used = bandwidth or args.bandwidth
    min_bytes = minimum_bytes(args)
    bound_s = {phase: min_bytes[phase] / bandwidth_used for phase in phases}
    over_bound = {
        f"{name}/{phase}": med[f"{name}/{phase}/wall"] / bound_s[phase]
        for name in impls
        for phase in phases
    }
    report = {
        "config": {
            "device": args.device,
            "fine": [1, args.channels, args.height, args.width],
            "coarse": [1, args.channels, args.height // 2, args.width // 2],
            "decoded": [1, args.decode_channels, args.height, args.width],
            "dtype": "float32",
            "features_layout": args.features_layout,
            "threads": args.threads,
            "repeats": args.repeats,
            "inner": args.inner if cuda else 1,
            "impls": list(impls),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(args.device)
            if cuda
            else platform.processor(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "max_rel_diff_vs_reference": timing["rel_diff"],
        "median_s": med,
        "min_s": {k: min(v) for k, v in timing["samples_s"].items()},
        "peak_mib": memory,
        "ratios": ratios,
        "bandwidth_bound": {
            "bandwidth_B_per_s": bandwidth_used,
            "bandwidth_measured": bandwidth is not None,
            "min_bytes": min_bytes,
            "bound_s": bound_s,
            "time_over_bound": over_bound,
        },
        "samples_s": timing["samples_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    max_diff = max(v for diffs in timing["rel_diff"].values() for v in diffs.values())
    if cuda:
        ms = {k: 1e3 * v for k, v in med.items()}
        parts = [
            f"{phase}: "
            + ", ".join(f"{name} {ms[f'{name}/{phase}/wall']:.3f} ms" for name in impls)
            + f" (bound {1e6 * bound_s[phase]:.1f} us; "
            + ", ".join(f"{name} {over_bound[f'{name}/{phase}']:.0f}x" for name in impls[1:])
            + " the bound)"
            for phase in phases
        ]
        print(
            f"ops_speed on {report['machine']['device_name']}, clustering+decode at "
            f"{args.height}x{args.width}, C_F={args.channels}: "
            + "; ".join(parts)
            + f"; bandwidth {bandwidth_used:.2e} B/s ({'measured' if bandwidth else 'given'}); "
            f"max relative diff {max_diff:.1e}; wrote {args.out}"
        )
        return 0
    print(
        "ops_speed: fast vs appendix-C listing, clustering+decode at "
        f"{args.height}x{args.width}, C_F={args.channels}, {args.threads} threads: "
        f"forward {ratios['speedup/fast/forward/wall']:.1f}x "
        f"(cpu {ratios['speedup/fast/forward/cpu']:.1f}x), "
        f"forward+backward {ratios['speedup/fast/forward_backward/wall']:.1f}x "
        f"(cpu {ratios['speedup/fast/forward_backward/cpu']:.1f}x) faster; peak memory "
        f"inference {memory['fast/inference']:.0f} vs {memory['reference/inference']:.0f} MiB, "
        f"train {memory['fast/train']:.0f} vs {memory['reference/train']:.0f} MiB; "
        f"max relative diff {max_diff:.1e}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
