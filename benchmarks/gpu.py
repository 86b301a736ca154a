"""One prepared GPU benchmark: ops, inference latency in every mode, kernel launches, training.

Measures on one device, within a global time budget (``--budget-s``, default 480 s), in this
order of priority (what would not fit in the time left is skipped and recorded as such):

1. ``ops``: eq. (3) clustering + eq. (5) decode at the stride-4 map of an 800x1216 image (as
   ``benchmarks/ops_speed.py``; every implementation it lists, e.g. ``reference``, ``fast``
   and any GPU kernel added there), forward and forward+backward;
2. ``latency`` (batch 1): the models of ``benchmarks/baselines_latency.py`` (its ``ade20k``
   and ``coco`` groups: PSPNet, HC-PSPNet, Deeplabv3, HC-Deeplabv3 at 512x512; HCFormer-R50,
   HCFormer-R50 w/o DCNv2, MaskFormer-R50 at 800x1216), random init, eval mode, in float32
   and bfloat16 (autocast), in the variants of :data:`VARIANTS` (plain eager; BatchNorms
   folded; + channels-last; CUDA graphs of the plain and of the folded model), with the CUDA
   kernels of one forward counted by ``torch.profiler`` (CPU: the aten ops);
3. ``training``: seconds per training step (``hcformer.engine.benchmark.time_training``: AMP,
   loss, backward, AdamW) of HCFormer R50 (COCO panoptic, ADE20K), MaskFormer R50, HCFormer
   Swin-L and PSPNet R101 at the paper's crop and batch (halved on out-of-memory), random init;
4. ``latency`` under ``torch.compile`` (batch 1, float32 then bfloat16) for the pairs
   HC-PSPNet / PSPNet and HCFormer-R50 / MaskFormer-R50, then batch 8, then the ``cityscapes``
   group at batch 1, then ``torch.compile(mode="reduce-overhead")``.

Every section and every measurement is guarded: an out-of-memory or any error is recorded and
the rest runs. Writes one JSON (``--out``) and a readable table next to it (``.txt``); the ratio
of each HC model to its baseline is given per variant. Needs only torch/torchvision/timm and
the package (no mlflow, snakemake, submitit or pycocotools).

    python benchmarks/gpu.py --out benchmarks/out/gpu.json              # on the GPU box
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu.json   # same code, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines_latency as bl  # noqa: E402

from hcformer.models.fuse import InferenceOptions, apply_options  # noqa: E402

# variant -> inference options (hcformer.models.fuse); the dtype is added per measurement.
VARIANTS: dict[str, InferenceOptions] = {
    "eager": InferenceOptions(),
    "fused": InferenceOptions(fuse=True),
    "fused_cl": InferenceOptions(fuse=True, channels_last=True),
    "eager_cuda_graph": InferenceOptions(cuda_graph=True),
    "cuda_graph": InferenceOptions(fuse=True, channels_last=True, cuda_graph=True),
    "compiled": InferenceOptions(fuse=True, channels_last=True, compile="default"),
    "compiled_cuda_graph": InferenceOptions(
        fuse=True, channels_last=True, compile="reduce-overhead"
    ),
}
EAGER_VARIANTS = ("eager", "fused", "fused_cl", "eager_cuda_graph", "cuda_graph")
DTYPES = ("float32", "bfloat16")
COMPILE_PAIRS = {"ade20k": ("HC-PSPNet", "PSPNet"), "coco": ("HCFormer-R50", "MaskFormer-R50")}
TRAINING = {
    "HCFormer R50 COCO": "coco_panoptic/hcformer-r50-L3-D8-Q100",
    "HCFormer R50 ADE20K": "ade20k/hcformer-r50-L3-D8-Q100",
    "MaskFormer R50": "coco_panoptic/maskformer-r50-D6-Q100-plus",
    "HCFormer Swin-L": "coco_panoptic/hcformer-swinl-L3-D8-Q200",
    "PSPNet R101": "ade20k/pspnet-r101-os8",
}
# --quick: the same models shrunk (as tests/test_baselines.py) at small inputs.
QUICK_BACKBONE = {"depths": [1, 1, 1, 1], "widths": [8, 16, 32, 64], "stem_width": 8}
QUICK_HEAD = {
    "hidden_dim": 32,
    "nheads": 4,
    "dim_feedforward": 64,
    "mask_dim": 32,
    "pixel_decoder_dim": 32,
}
QUICK_SIZES = {"ade20k": (64, 64), "coco": (64, 96), "cityscapes": (64, 128)}
QUICK_MODELS = {  # --quick: the first pair of each group, one model of the cityscapes group
    "ade20k": ["PSPNet", "HC-PSPNet"],
    "coco": ["HCFormer-R50", "MaskFormer-R50"],
    "cityscapes": ["FCN-32s"],
}
QUICK_TRAINING = ("HCFormer R50 COCO", "PSPNet R101")


class Budget:
    """Wall-clock budget of the whole run: ``fits(estimate)`` says whether a step still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    return f"{kind}: {first}"[:300]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], device: torch.device, *, reps: int, max_s: float) -> dict:
    """Two warm-up calls (the first one timed: compilation, graph capture), then up to ``reps``
    synchronised calls within ``max_s``; median and minimum milliseconds."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - started < max_s):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "reps": len(times),
        "first_call_s": first,
    }


def count_kernels(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """What one call launches: on CUDA the kernels (and memcpy/memset) the profiler sees on the
    device and the kernel-launch API calls; on CPU the aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return {
            "cuda_kernels": sum(1 for e in events if e.device_type == DeviceType.CUDA),
            "launch_calls": sum(1 for e in events if "LaunchKernel" in e.name),
        }
    return {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}


class Runner:
    """Runs the sections, records results, failures and skips (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.budget = Budget(args.budget_s)
        self.quick = args.quick
        self.sections: dict[str, dict[str, Any]] = {}
        self.reps = 2 if self.quick else args.reps
        self.max_s = 0.05 if self.quick else args.max_s
        self.compile_estimate_s = 30.0 if self.quick else 90.0  # updated with measured compiles

    # -- bookkeeping
    def section(self, name: str) -> dict[str, Any]:
        return self.sections.setdefault(
            name, {"status": "ok", "results": [], "failed": [], "skipped": [], "seconds": 0.0}
        )

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        sec = self.section(name)
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a whole section failed: record it, run the rest
            sec["status"] = "failed"
            sec["failed"].append({"what": name, "error": _error(exc)})
            traceback.print_exc()
            _free(self.device)
        sec["seconds"] += time.perf_counter() - started
        print(f"[{self.budget.elapsed():6.0f} s] {name}: {sec['status']}", flush=True)

    def skip(self, name: str, what: dict, reason: str) -> None:
        self.section(name)["skipped"].append({**what, "reason": reason})

    # -- environment
    def environment(self) -> None:
        env = {
            "device": self.args.device,
            "device_name": (
                torch.cuda.get_device_name(self.device)
                if self.device.type == "cuda"
                else platform.processor() or platform.machine()
            ),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()
            if torch.backends.cudnn.is_available()
            else None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "quick": self.quick,
            "budget_s": self.budget.seconds,
        }
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        self.section("environment")["results"].append(env)

    # -- eq. (3) + (5)
    def ops(self) -> None:
        import ops_speed

        impls = getattr(ops_speed, "IMPLS", ("reference", "fast"))
        available = getattr(ops_speed, "available_impls", lambda device: impls)(self.args.device)
        h, w = (16, 24) if self.quick else (200, 304)
        shape = argparse.Namespace(
            height=h,
            width=w,
            channels=128,
            decode_channels=100,
            features_layout="channels_last",
        )
        sec = self.section("ops")
        for name in impls:
            for phase, backward in (("forward", False), ("forward_backward", True)):
                what = {"impl": name, "phase": phase, "fine": [h, w], "channels": 128}
                if name not in available:
                    self.skip("ops", what, f"not available on {self.args.device}")
                    continue
                if not self.budget.fits(5.0):
                    self.skip("ops", what, "budget")
                    continue
                try:
                    impl = ops_speed._module(name)
                    tensors = [
                        t.detach().to(self.device).requires_grad_(backward)
                        for t in ops_speed._inputs(shape, requires_grad=False)
                    ]

                    def step(impl=impl, tensors=tensors, backward=backward):
                        with torch.set_grad_enabled(backward):
                            ops_speed._step(impl, *tensors, backward=backward)

                    sec["results"].append(
                        {**what, **timed_calls(step, self.device, reps=self.reps, max_s=self.max_s)}
                    )
                except Exception as exc:
                    sec["failed"].append({**what, "error": _error(exc)})
                    _free(self.device)

    # -- inference latency
    def _spec_update(self, spec: dict) -> dict:
        if not self.quick:
            return spec
        spec = {**spec, "backbone": {**spec["backbone"], **QUICK_BACKBONE, "cluster_dim": 16}}
        spec["head"] = {**spec["head"], **QUICK_HEAD, "queries": 16, "decoder_layers": 2}
        if spec["head"].get("encoder_layers"):
            spec["head"]["encoder_layers"] = 1
        return spec

    def latency(
        self,
        group: str,
        *,
        models: list[str] | None = None,
        variants: tuple[str, ...],
        dtypes: tuple[str, ...] = DTYPES,
        batch: int = 1,
        kernels: bool = True,
    ) -> None:
        spec = bl.GROUPS[group]
        h, w = QUICK_SIZES[group] if self.quick else spec["size"]
        images = (
            torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
        ).to(self.device)
        sec = self.section("latency")
        if models is None:
            models = QUICK_MODELS[group] if self.quick else spec["models"]
        for label in models:
            plain = None
            for dtype in dtypes:
                for variant in variants:
                    options = dataclasses.replace(VARIANTS[variant], dtype=dtype)
                    what = {
                        "group": group,
                        "model": label,
                        "size": [h, w],
                        "batch": batch,
                        "dtype": dtype,
                        "variant": variant,
                    }
                    if options.cuda_graph and self.device.type != "cuda":
                        self.skip("latency", what, "CUDA graphs need a CUDA device")
                        continue
                    compiled = options.compile is not None
                    estimate = self.compile_estimate_s if compiled else 3.0
                    if not self.budget.fits(estimate):
                        self.skip("latency", what, "budget")
                        continue
                    try:
                        if plain is None:
                            plain = bl.build(
                                label,
                                spec["num_classes"],
                                device=str(self.device),
                                spec_update=self._spec_update,
                            )
                        model = apply_options(plain, options)
                        if compiled:
                            torch._dynamo.utils.counters.clear()

                        def forward(model=model):
                            with torch.inference_mode():
                                model(images)

                        result = {
                            **what,
                            **timed_calls(forward, self.device, reps=self.reps, max_s=self.max_s),
                        }
                        if compiled:
                            self.compile_estimate_s = max(
                                self.compile_estimate_s, 1.2 * result["first_call_s"]
                            )
                            breaks = torch._dynamo.utils.counters["graph_break"]
                            result["graph_breaks"] = sum(breaks.values())
                        if kernels and not options.cuda_graph:
                            result["kernels"] = count_kernels(forward, self.device)
                        sec["results"].append(result)
                    except Exception as exc:
                        sec["failed"].append({**what, "error": _error(exc)})
                        traceback.print_exc()
                    finally:
                        model = None
                        if compiled:
                            torch._dynamo.reset()
                        _free(self.device)
            plain = None
            _free(self.device)

    # -- training steps
    def training(self) -> None:
        from hcformer.engine.benchmark import time_training
        from hcformer.experiments import resolve

        sec = self.section("training")
        estimate = 10.0 if self.quick else 40.0
        for label, exp_id in TRAINING.items():
            what = {"model": label, "experiment": exp_id}
            if self.quick and label not in QUICK_TRAINING:
                self.skip("training", what, "--quick")
                continue
            if not self.budget.fits(estimate):
                self.skip("training", what, "budget")
                continue
            started = time.perf_counter()
            try:
                cfg = resolve(exp_id, "tiny" if self.quick else "paper")
                backbone = dataclasses.replace(cfg.model.backbone, pretrained="")  # no download
                cfg = dataclasses.replace(
                    cfg, model=dataclasses.replace(cfg.model, backbone=backbone)
                )
                batch = 2 if self.quick else cfg.solver.batch_size
                while True:
                    try:
                        result = time_training(
                            cfg,
                            batch=batch,
                            iterations=1 if self.quick else 5,
                            warmup=0 if self.quick else 2,
                            device=self.device,
                        )
                        break
                    except torch.OutOfMemoryError:
                        _free(self.device)
                        if batch == 1:
                            raise
                        batch //= 2
                sec["results"].append({**what, "batch_config": cfg.solver.batch_size, **result})
            except Exception as exc:
                sec["failed"].append({**what, "error": _error(exc)})
                traceback.print_exc()
            _free(self.device)
            estimate = max(estimate, time.perf_counter() - started)

    # -- the plan
    def run(self) -> dict[str, Any]:
        quick = self.quick
        self.guarded("environment", self.environment)
        self.guarded("ops", self.ops)
        for group in ("ade20k", "coco"):
            self.guarded("latency", lambda g=group: self.latency(g, variants=EAGER_VARIANTS))
        # --quick compiles one model (tens of seconds on a CPU) before the training steps.
        pairs = {"ade20k": ("HC-PSPNet",)} if quick else COMPILE_PAIRS
        compiled = [
            lambda g=group, m=models, d=dtype: self.latency(
                g, models=list(m), variants=("compiled",), dtypes=(d,)
            )
            for dtype in (("float32",) if quick else DTYPES)
            for group, models in pairs.items()
        ]
        if quick:
            for step in compiled:
                self.guarded("latency", step)
        self.guarded("training", self.training)
        if not quick:
            for step in compiled:
                self.guarded("latency", step)
        batch = 2 if quick else 8
        for group in ("ade20k", "coco"):
            self.guarded(
                "latency",
                lambda g=group: self.latency(
                    g,
                    variants=("eager", "fused_cl", "cuda_graph"),
                    dtypes=("float32",) if quick else DTYPES,
                    batch=batch,
                    kernels=False,
                ),
            )
        self.guarded("latency", lambda: self.latency("cityscapes", variants=EAGER_VARIANTS))
        if not quick:
            for group, models in COMPILE_PAIRS.items():
                self.guarded(
                    "latency",
                    lambda g=group, m=models: self.latency(
                        g, models=list(m), variants=("compiled_cuda_graph",), dtypes=("float32",)
                    ),
                )
        self.sections["pairs"] = {"status": "ok", "results": pair_ratios(self.sections)}
        return {
            "benchmark": "benchmarks/gpu.py",
            "argv": sys.argv[1:],
            "elapsed_s": self.budget.elapsed(),
            "sections": self.sections,
        }


def pair_ratios(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """Median-latency ratio of each HC model to its baseline (``baselines_latency.GROUPS``) per
    (batch, dtype, variant) measured for both, with the paper's ratio where it has one."""
    rows = sections.get("latency", {}).get("results", [])
    ms = {
        (r["group"], r["model"], r["batch"], r["dtype"], r["variant"]): r["median_ms"] for r in rows
    }
    out = []
    for (group, model, batch, dtype, variant), fast_ms in sorted(ms.items()):
        for fast, slow, goal in bl.GROUPS[group]["pairs"]:
            slow_ms = ms.get((group, slow, batch, dtype, variant))
            if fast == model and slow_ms:
                out.append(
                    {
                        "group": group,
                        "model": fast,
                        "baseline": slow,
                        "batch": batch,
                        "dtype": dtype,
                        "variant": variant,
                        "ratio": fast_ms / slow_ms,
                        "goal": goal,
                        "paper_ratio": bl._paper_ratio(group, fast, slow),
                    }
                )
    return out


def readable(result: dict[str, Any]) -> str:
    """The JSON as text tables."""
    sections = result["sections"]
    lines = [f"benchmarks/gpu.py: {result['elapsed_s']:.0f} s"]
    env = sections.get("environment", {}).get("results", [{}])
    env = env[0] if env else {}
    lines.append(
        f"device {env.get('device_name')} | torch {env.get('torch')} | cuda {env.get('cuda')} | "
        f"triton {env.get('triton')} | quick {env.get('quick')}"
    )
    lines += ["", "== status =="]
    for name, sec in sections.items():
        lines.append(
            f"{name:<12} {sec['status']:<7} {len(sec.get('results', [])):4d} results "
            f"{len(sec.get('failed', [])):3d} failed {len(sec.get('skipped', [])):3d} skipped "
            f"{sec.get('seconds', 0.0):6.1f} s"
        )
    ops = sections.get("ops", {}).get("results", [])
    if ops:
        lines += ["", "== ops: eq. (3) clustering + eq. (5) decode (ms, median) =="]
        for r in ops:
            lines.append(
                f"{r['impl']:<12} {r['phase']:<17} {r['fine'][0]}x{r['fine'][1]} "
                f"{r['median_ms']:9.3f} ms"
            )
    lat = sections.get("latency", {}).get("results", [])
    if lat:
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in lat)]
        lines += ["", "== latency (ms per forward, median; kernels per forward in brackets) =="]
        lines.append(
            f"{'group':<10} {'model':<24} {'b':>2} {'dtype':<8} "
            + " ".join(f"{v:>19}" for v in variants)
        )
        keyed: dict[tuple, dict[str, dict]] = {}
        for r in lat:
            keyed.setdefault((r["group"], r["model"], r["batch"], r["dtype"]), {})[r["variant"]] = r
        for (group, model, batch, dtype), by_variant in keyed.items():
            cells = []
            for v in variants:
                r = by_variant.get(v)
                if r is None:
                    cells.append(f"{'-':>19}")
                    continue
                k = r.get("kernels", {})
                n = k.get("cuda_kernels", k.get("aten_ops"))
                cells.append(
                    f"{r['median_ms']:9.2f}" + (f" [{n:>6}]" if n is not None else " " * 9)
                )
            lines.append(f"{group:<10} {model:<24} {batch:>2} {dtype:<8} " + " ".join(cells))
    pairs = sections.get("pairs", {}).get("results", [])
    if pairs:
        lines += ["", "== ratios HC model / baseline (median latency) =="]
        for p in pairs:
            paper = f"paper {p['paper_ratio']:.2f}x" if p["paper_ratio"] else ""
            lines.append(
                f"{p['group']:<10} {p['model'] + ' / ' + p['baseline']:<36} b{p['batch']} "
                f"{p['dtype']:<8} {p['variant']:<20} {p['ratio']:6.2f}x  {paper}"
            )
    train = sections.get("training", {}).get("results", [])
    if train:
        lines += ["", "== training step (median s/iteration) =="]
        for r in train:
            mem = f"{r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
            lines.append(
                f"{r['model']:<22} batch {r['batch']:>3} {r['input_size'][0]}x{r['input_size'][1]} "
                f"amp {r['amp']!s:<5} {r['seconds_per_iteration']:8.3f} s "
                f"{r['images_per_second']:7.1f} img/s {mem}"
            )
    problems = [
        (name, kind, entry)
        for name, sec in sections.items()
        for kind in ("failed", "skipped")
        for entry in sec.get(kind, [])
    ]
    if problems:
        lines += ["", "== failed (each) / skipped (counted by reason) =="]
        skipped: dict[tuple[str, str], int] = {}
        for name, kind, entry in problems:
            if kind == "skipped":
                key = (name, entry["reason"])
                skipped[key] = skipped.get(key, 0) + 1
                continue
            what = {k: v for k, v in entry.items() if k != "error"}
            lines.append(f"{name:<10} failed   {json.dumps(what)}: {entry['error']}")
        for (name, reason), n in skipped.items():
            lines.append(f"{name:<10} skipped  {n} measurement(s): {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="global wall-clock budget")
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs (CI)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement (max)")
    parser.add_argument("--max-s", type=float, default=0.5, help="seconds per measurement (max)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/out/gpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    # Each compiled model is a new set of guards on the same code objects: allow them all.
    limit = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    setattr(torch._dynamo.config, limit, 64)
    result = Runner(args).run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    text = readable(result)
    out.with_suffix(".txt").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
