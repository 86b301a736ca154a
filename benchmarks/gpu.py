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
   group at batch 1, then ``torch.compile(mode="reduce-overhead")``;
5. ``profile``: where the device time goes (``torch.profiler``): for the models of
   :data:`PROFILE` and the Triton eq. (3)+(5) forward+backward, the summed kernel time against
   the wall time of the call (the gap is host overhead), the kernels that take most of it, and
   the kernel time under each module (two levels of module names).

``--sections ops,profile`` runs only those sections (the environment is always recorded).

Every section and every measurement is guarded: an out-of-memory or any error is recorded and
the rest runs. Writes one JSON (``--out``) and a readable table next to it (``.txt``); the ratio
of each HC model to its baseline is given per variant. Needs only torch/torchvision/timm and
the package (no mlflow, snakemake, submitit or pycocotools).

    python benchmarks/gpu.py --out benchmarks/out/gpu.json              # on the GPU box
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu.json   # same code, tiny shapes
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import platform
import re
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

from hcformer.models.dcn import tf32_products  # noqa: E402
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
# (group, model, variant) whose device time is broken down by kernel and module.
PROFILE = (
    ("cityscapes", "HC-PSPNet", "fused"),
    ("cityscapes", "PSPNet", "fused"),
    ("cityscapes", "HC-Deeplabv3", "fused"),
    ("coco", "HCFormer-R50", "fused_cl"),
    ("coco", "MaskFormer-R50", "fused_cl"),
)
QUICK_PROFILE = (("ade20k", "HC-PSPNet", "fused"),)
SECTIONS = ("ops", "latency", "training", "profile", "dcn")


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


def _activities(device: torch.device) -> list[Any]:
    """What ``torch.profiler`` records: the CPU, and the device's kernels on CUDA."""
    from torch.profiler import ProfilerActivity

    cuda = [ProfilerActivity.CUDA] if device.type == "cuda" else []
    return [ProfilerActivity.CPU, *cuda]


def count_kernels(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """What one call launches: on CUDA the kernels (and memcpy/memset) the profiler sees on the
    device and the kernel-launch API calls; on CPU the aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import profile

    with profile(activities=_activities(device)) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return {
            "cuda_kernels": sum(1 for e in events if e.device_type == DeviceType.CUDA),
            "launch_calls": sum(1 for e in events if "LaunchKernel" in e.name),
        }
    return {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}


def _annotate(model: torch.nn.Module, depth: int = 2) -> tuple[list[Any], set[str]]:
    """Wrap each module down to ``depth`` levels of names (``backbone``, ``backbone.layer4``)
    and every clustering module in a ``torch.profiler.record_function`` of its name; returns
    the hook handles and the names."""
    handles, names = [], set()
    for name, module in model.named_modules():
        clustering = type(module).__name__ == "ClusteringModule"  # eq. (3), at any depth
        if not name or (name.count(".") >= depth and not clustering):
            continue

        def enter(mod, args, name=name):
            mod._profile_region = torch.profiler.record_function(name)
            mod._profile_region.__enter__()

        def leave(mod, args, output):
            mod._profile_region.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        names.add(name)
    return handles, names


def device_profile(
    fn: Callable[[], Any], device: torch.device, *, regions: set[str] = frozenset(), top: int = 12
) -> dict:
    """One call of ``fn`` under ``torch.profiler``: its wall time, the summed time of the
    device kernels it ran (CPU: of the aten ops, self time), the ``top`` kernels by total time
    and the time under each ``record_function`` region (:func:`_annotate`'s module names)."""
    from torch.profiler import profile

    with profile(activities=_activities(device)) as prof:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - t0
    return profile_summary(prof, device.type == "cuda", wall, regions=regions, top=top)


def dcn_shapes(size: tuple[int, int], shrink: int = 1) -> list[tuple[int, ...]]:
    """(in, out, k, H, W) of the six DCNs of an HC ResNet-50 (each stage's strided 3x3 conv2 and
    1x1 shortcut of res3, res4, res5) for input images of ``size``; channels / ``shrink``."""
    h, w = size
    out = []
    for stage, (mid, c_in) in enumerate(((128, 256), (256, 512), (512, 1024))):
        hh, ww = h // (4 << stage), w // (4 << stage)
        out.append((mid // shrink, mid // shrink, 3, hh, ww))
        out.append((c_in // shrink, 4 * mid // shrink, 1, hh, ww))
    return out


def host_profile(fn: Callable[[], Any], calls: int = 20, top: int = 15) -> list[str]:
    """cProfile of ``calls`` calls of ``fn`` (after the warm-up done by the caller): the ``top``
    functions by own time, as text lines (host overhead of a launch-bound call)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1 :]


def _kernel_name(name: str) -> str:
    """A kernel's name short enough to read (namespaces dropped, so that the functor of torch's
    element-wise kernels shows)."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "at::", "c10::"):
        name = name.replace(noise, "")
    return re.sub(r"elementwise_kernel<\d+, \d+, ", "elementwise<", name)[:160]


def profile_summary(
    prof: Any, cuda: bool, wall_s: float, *, regions: set[str] = frozenset(), top: int = 12
) -> dict:
    """Kernel time, top kernels and per-region kernel time of a finished ``torch.profiler``:
    a region's time is the sum of the kernels that ran inside its span on the device (CPU: the
    region's CPU time)."""
    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = {}
    region_ms: dict[str, float] = {}
    spans, intervals = [], []
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            if e.name.startswith("ProfilerStep"):  # the profiler's own step marker
                continue
            if e.name in regions:  # the region's span on the device, not a kernel
                spans.append((e.name, e.time_range.start, e.time_range.end))
                continue
            stat = kernels.setdefault(_kernel_name(e.name), [0, 0.0])
            stat[0] += 1
            stat[1] += e.time_range.elapsed_us() / 1e3
            intervals.append((e.time_range.start, e.time_range.end))
        elif not cuda and e.name.startswith("aten::"):
            stat = kernels.setdefault(e.name, [0, 0.0])
            stat[0] += 1
            stat[1] += e.self_cpu_time_total / 1e3
        if not cuda and e.device_type == DeviceType.CPU and e.name in regions:
            region_ms[e.name] = region_ms.get(e.name, 0.0) + e.cpu_time_total / 1e3
    intervals.sort()
    starts = [s for s, _ in intervals]
    for name, start, end in spans:
        lo, hi = bisect.bisect_left(starts, start), bisect.bisect_right(starts, end)
        inside = sum(e - s for s, e in intervals[lo:hi] if e <= end) / 1e3
        region_ms[name] = region_ms.get(name, 0.0) + inside
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    kernel_ms = sum(v[1] for v in kernels.values())
    if regions:  # what ran outside every top-level module (e.g. eq. (5) in the model's forward)
        top_level = sum(ms for name, ms in region_ms.items() if "." not in name)
        region_ms["(outside modules)"] = kernel_ms - top_level
    return {
        "wall_ms": wall_s * 1e3,
        "kernel_ms": kernel_ms,
        "kernels": sum(v[0] for v in kernels.values()),
        "top": [{"name": k, "count": c, "ms": ms} for k, (c, ms) in ranked[:top]],
        "regions_ms": dict(sorted(region_ms.items(), key=lambda kv: -kv[1])[:40]),
    }


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
        self.enabled = set(args.sections.split(",")) if args.sections else set(SECTIONS)

    # -- bookkeeping
    def section(self, name: str) -> dict[str, Any]:
        return self.sections.setdefault(
            name, {"status": "ok", "results": [], "failed": [], "skipped": [], "seconds": 0.0}
        )

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        if name != "environment" and name not in self.enabled:
            return
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
        h, w = self._ops_size()
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
                    step = self._ops_step(name, backward)
                    sec["results"].append(
                        {**what, **timed_calls(step, self.device, reps=self.reps, max_s=self.max_s)}
                    )
                except Exception as exc:
                    sec["failed"].append({**what, "error": _error(exc)})
                    _free(self.device)

    def _ops_size(self) -> tuple[int, int]:
        """The fine map of eq. (3)+(5): the stride-4 map of an 800x1216 image (16x24 quick)."""
        return (16, 24) if self.quick else (200, 304)

    def _ops_step(self, name: str, backward: bool) -> Callable[[], None]:
        """One eq. (3)+(5) call of ``ops_speed``'s implementation ``name`` (C_F 128, 100 decoded
        channels, channels-last features) on this device, with the backward if ``backward``."""
        import ops_speed

        h, w = self._ops_size()
        shape = argparse.Namespace(
            height=h, width=w, channels=128, decode_channels=100, features_layout="channels_last"
        )
        impl = ops_speed._module(name)
        tensors = [
            t.detach().to(self.device).requires_grad_(backward)
            for t in ops_speed._inputs(shape, requires_grad=False)
        ]

        def step() -> None:
            with torch.set_grad_enabled(backward):
                ops_speed._step(impl, *tensors, backward=backward)

        return step

    def _images(self, group: str, batch: int = 1) -> torch.Tensor:
        """Random images 0..255 at ``group``'s size (its quick size with ``--quick``)."""
        h, w = QUICK_SIZES[group] if self.quick else bl.GROUPS[group]["size"]
        images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
        return images.to(self.device)

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
        images = self._images(group, batch)
        h, w = images.shape[-2:]
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

    # -- where the device time goes
    def profile(self) -> None:
        sec = self.section("profile")
        plan = QUICK_PROFILE if self.quick else PROFILE
        for group, label, variant in plan:
            what = {"group": group, "model": label, "variant": variant}
            if not self.budget.fits(10.0):
                self.skip("profile", what, "budget")
                continue
            model = None
            try:
                spec = bl.GROUPS[group]
                images = self._images(group)
                h, w = images.shape[-2:]
                plain = bl.build(
                    label,
                    spec["num_classes"],
                    device=str(self.device),
                    spec_update=self._spec_update,
                )
                handles, names = _annotate(plain)
                model = apply_options(plain, VARIANTS[variant])

                def forward(model=model, images=images):
                    with torch.inference_mode():
                        model(images)

                forward(), forward()
                sec["results"].append(
                    {**what, "size": [h, w], **device_profile(forward, self.device, regions=names)}
                )
                for handle in handles:
                    handle.remove()
            except Exception as exc:
                sec["failed"].append({**what, "error": _error(exc)})
                traceback.print_exc()
            model = None
            _free(self.device)
        self.profile_ops(sec)
        if self.budget.fits(30.0):
            self.guarded("dcn", self.dcn)
        if self.budget.fits(40.0):
            self.profile_training(sec)

    def profile_ops(self, sec: dict) -> None:
        """eq. (3)+(5) forward+backward (Triton where it runs, else the fast path) under the
        profiler, and a ``cProfile`` of its host time."""
        import ops_speed

        name = "triton" if "triton" in ops_speed.available_impls(self.args.device) else "fast"
        step = self._ops_step(name, backward=True)
        step(), step()
        what = {"group": "ops", "model": "eq. (3)+(5) forward+backward", "variant": name}
        sec["results"].append(
            {**what, "size": list(self._ops_size()), **device_profile(step, self.device)}
        )
        sec["host"] = host_profile(step)

    def profile_training(self, sec: dict) -> None:
        """One training step of HCFormer R50 COCO (after one warm-up step) under the profiler:
        its kernel time and top kernels, forward and backward together."""
        from torch.profiler import profile, schedule

        from hcformer.engine.benchmark import time_training
        from hcformer.experiments import resolve

        label = "HCFormer R50 COCO"
        cfg = resolve(TRAINING[label], "tiny" if self.quick else "paper")
        backbone = dataclasses.replace(cfg.model.backbone, pretrained="")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))
        schedule_ = schedule(wait=0, warmup=1, active=1, repeat=1)
        with profile(activities=_activities(self.device), schedule=schedule_) as prof:
            result = time_training(
                cfg,
                batch=2 if self.quick else cfg.solver.batch_size,
                iterations=1,
                warmup=1,
                device=self.device,
                after_step=prof.step,
            )
        cuda = self.device.type == "cuda"
        summary = profile_summary(prof, cuda, result["seconds_per_iteration"], top=25)
        sec["results"].append({"group": "training", "model": label, "variant": "amp", **summary})
        _free(self.device)

    def dcn(self) -> None:
        """DCNv2 at HCFormer-R50's six DCN shapes (COCO 800x1216, batch 1 inference; 1024x1024
        at batch 16, forward+backward as in training): torchvision's ``deform_conv2d`` against
        ``sampled_deform_conv2d`` (``grid_sample`` + one product), fp32, TF32 products off/on."""
        from torchvision.ops import deform_conv2d

        from hcformer.models.dcn import sampled_deform_conv2d

        sec = self.section("dcn")
        impls = {"torchvision": deform_conv2d, "sampled": sampled_deform_conv2d}
        cases = ((1, (800, 1216), False), (16, (1024, 1024), True))
        if self.quick:
            cases = ((1, (64, 96), False), (2, (64, 64), True))
        for batch, size, backward in cases:
            for (name, impl), tf32 in itertools.product(impls.items(), (False, True)):
                what = {"impl": name, "batch": batch, "size": list(size), "backward": backward}
                what["tf32"] = tf32
                if not self.budget.fits(5.0):
                    self.skip("dcn", what, "budget")
                    continue
                try:
                    ms = sum(
                        self._dcn_ms(impl, shape, batch, backward, tf32)
                        for shape in dcn_shapes(size, 16 if self.quick else 1)
                    )
                    sec["results"].append({**what, "median_ms_all_six": ms})
                except Exception as exc:
                    sec["failed"].append({**what, "error": _error(exc)})
                _free(self.device)

    def _dcn_ms(self, impl, shape, batch: int, backward: bool, tf32: bool) -> float:
        c_in, c_out, k, hh, ww = shape
        gen = torch.Generator().manual_seed(0)

        def rand(*size):
            return torch.randn(*size, generator=gen).to(self.device).requires_grad_(backward)

        x, weight, bias = rand(batch, c_in, hh, ww), rand(c_out, c_in, k, k), rand(c_out)
        offset = rand(batch, 2 * k * k, hh // 2, ww // 2)
        mask = torch.rand(batch, k * k, hh // 2, ww // 2, generator=gen).to(self.device)

        def call():
            with torch.set_grad_enabled(backward):
                out = impl(x, offset, weight, bias, stride=2, padding=k // 2, dilation=1, mask=mask)
                if backward:
                    out.sum().backward()

        with tf32_products(tf32):
            return timed_calls(call, self.device, reps=self.reps, max_s=self.max_s)["median_ms"]

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
        self.guarded("profile", self.profile)
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
    profiled = sections.get("profile", {}).get("results", [])
    if profiled:
        lines += [
            "",
            "== profile: device time of one call (kernels summed) against its wall time ==",
        ]
        for r in profiled:
            lines.append(
                f"{r['group']:<10} {r['model']:<28} {r['variant']:<9} wall {r['wall_ms']:8.2f} ms"
                f"  kernels {r['kernel_ms']:8.2f} ms in {r['kernels']:5d}"
            )
            for k in r["top"][:8]:
                lines.append(f"    {k['ms']:8.2f} ms {k['count']:5d}x  {k['name'][:110]}")
            regions = [(n, ms) for n, ms in r["regions_ms"].items() if ms > 0.02 * r["kernel_ms"]]
            if regions:
                lines.append("    modules: " + ", ".join(f"{n} {ms:.2f}" for n, ms in regions))
    host = sections.get("profile", {}).get("host")
    if host:
        lines += ["", "== host: cProfile of 20 calls of eq. (3)+(5) forward+backward =="]
        lines += [line[:150] for line in host]
    dcn = sections.get("dcn", {}).get("results", [])
    if dcn:
        lines += ["", "== DCNv2, HCFormer-R50's six DCNs summed (ms, median) =="]
        for r in dcn:
            lines.append(
                f"{r['impl']:<12} batch {r['batch']:>2} backward {r['backward']!s:<5} "
                f"tf32 {r['tf32']!s:<5} {r['median_ms_all_six']:9.3f} ms"
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
            phases = r.get("phase_seconds", {})
            if phases:
                lines.append("    " + " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))
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
    parser.add_argument(
        "--sections",
        default="",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.sections.split(","))) - set(SECTIONS)
    if unknown:
        print(
            f"benchmarks/gpu.py: --sections {args.sections!r}: unknown {sorted(unknown)} "
            f"(expected a comma-separated subset of {','.join(SECTIONS)})",
            file=sys.stderr,
        )
        return 2
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
