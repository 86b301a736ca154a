"""Latency of HCFormer and the HC per-pixel models against the baselines the paper trained.

In ONE run and on the same input, times (eval mode, ``torch.inference_mode``, batch 1, random
init at paper size, median of repeats after a warm-up) the wall-clock time and the CPU time of
the process (``time.process_time``) of each forward:

- HCFormer-R50 against MaskFormer-R50 ("R50 + 6 Enc") at COCO size 800x1216, 133 classes;
- PSPNet / Deeplabv3 (dilated R101, output stride 8) against HC-PSPNet / HC-Deeplabv3 (R101 at
  stride 32, three clustering modules, DCNv2) at ADE20K 512x512 (150 classes) and Cityscapes
  1024x2048 (19 classes), and FCN-32s / FPN / HC-FCN-32s at Cityscapes (Table I b).

The repeats of the models being compared are interleaved (round-robin), so a load spike on a
shared machine hits all of them alike. Each group gets a wall-clock budget: after one warm-up
call per model it runs whole rounds until the budget is spent (at least ``--min-rounds``, at most
``--max-rounds``). The ratios are taken on CPU time with ONE thread by default: on a shared
2-core machine (load average ~7 while this was written) OpenMP's spinning worker threads made a
2-thread call's wall and CPU time vary up to 5x from call to call (PSPNet at 256x256: 3.6-14.8 s
wall, 2.3-5.8 s CPU), while one thread's CPU time varied by under 3%. ``--threads 2`` measures
the 2-thread setting on an idle machine.

Goals: HCFormer-R50 at most 0.48x MaskFormer-R50 (the paper's FLOP ratio 87/181);
HC-PSPNet and HC-Deeplabv3 at most 0.4x their baselines (the paper's 19.0/48.7 and 22.5/62.5
ms on ADE20K on its GPU).

    python benchmarks/baselines_latency.py --out benchmarks/out/baselines_latency.json

The inference fast paths of :mod:`hcformer.models.fuse` apply to every model alike: ``--fuse``
(BatchNorms folded into the convs), ``--channels-last``, ``--dtype bfloat16`` (autocast),
``--compile [MODE]`` and ``--cuda-graph`` (with ``--device cuda``, where ratios are taken on
wall-clock time, each call synchronised).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hcformer.commands._args import add_inference_arguments, inference_options
from hcformer.config import build_config
from hcformer.models import build_model
from hcformer.models.fuse import InferenceOptions, apply_options

R50_COCO = {"name": "resnet50", "pretrained": ""}
R101 = {"name": "resnet101", "pretrained": ""}

MODELS: dict[str, dict[str, Any]] = {
    "HCFormer-R50": {
        "num_classes": 133,
        "backbone": {**R50_COCO, "hierarchy_level": 3, "dcnv2": True},
        "head": {"type": "hcformer", "decoder": "masked", "queries": 100, "decoder_layers": 8},
    },
    "HCFormer-R50 w/o DCNv2": {
        "num_classes": 133,
        "backbone": {**R50_COCO, "hierarchy_level": 3, "dcnv2": False},
        "head": {"type": "hcformer", "decoder": "masked", "queries": 100, "decoder_layers": 8},
    },
    "MaskFormer-R50": {
        "num_classes": 133,
        "backbone": {**R50_COCO, "hierarchy_level": 0, "dcnv2": False},
        "head": {
            "type": "maskformer",
            "decoder": "standard",
            "queries": 100,
            "decoder_layers": 6,
            "encoder_layers": 6,
            "decoder_dropout": 0.1,
        },
    },
}
for _kind, _label in [
    ("fcn32s", "FCN-32s"),
    ("fpn", "FPN"),
    ("pspnet", "PSPNet"),
    ("deeplabv3", "Deeplabv3"),
]:
    _os = 8 if _kind in ("pspnet", "deeplabv3") else 32
    MODELS[_label] = {
        "backbone": {**R101, "hierarchy_level": 0, "dcnv2": False, "output_stride": _os},
        "head": {"type": _kind},
    }
    if _kind != "fpn":
        MODELS[f"HC-{_label}"] = {
            "backbone": {**R101, "hierarchy_level": 3, "dcnv2": True, "output_stride": 32},
            "head": {"type": _kind},
        }

# group name -> (input H, W, num_classes or None to keep the model's, models, (fast, slow) pairs)
GROUPS: dict[str, dict[str, Any]] = {
    "coco": {
        "size": (800, 1216),
        "num_classes": None,
        "models": ["HCFormer-R50", "HCFormer-R50 w/o DCNv2", "MaskFormer-R50"],
        "pairs": [
            ("HCFormer-R50", "MaskFormer-R50", 0.48),
            ("HCFormer-R50 w/o DCNv2", "MaskFormer-R50", None),
        ],
    },
    "ade20k": {
        "size": (512, 512),
        "num_classes": 150,
        "models": ["PSPNet", "HC-PSPNet", "Deeplabv3", "HC-Deeplabv3"],
        "pairs": [("HC-PSPNet", "PSPNet", 0.4), ("HC-Deeplabv3", "Deeplabv3", 0.4)],
    },
    "cityscapes": {
        "size": (1024, 2048),
        "num_classes": 19,
        # ~2 TMACs per call for the dilated models: tens of seconds per call, so first-call
        # costs are negligible; no warm-up and one round (one thread's CPU time varies by a few
        # percent) keep the whole benchmark near 10 minutes on a loaded 2-core machine.
        "warmup": False,
        "max_rounds": 1,
        "models": [
            "FCN-32s",
            "FPN",
            "HC-FCN-32s",
            "PSPNet",
            "HC-PSPNet",
            "Deeplabv3",
            "HC-Deeplabv3",
        ],
        "pairs": [
            ("HC-FCN-32s", "FCN-32s", None),
            ("HC-FCN-32s", "FPN", None),
            ("HC-PSPNet", "PSPNet", 0.4),
            ("HC-Deeplabv3", "Deeplabv3", 0.4),
        ],
    },
}

# The paper's msec/image on its GPU (Table I), for the readable report only.
PAPER_MS = {
    "ade20k": {"PSPNet": 48.7, "HC-PSPNet": 19.0, "Deeplabv3": 62.5, "HC-Deeplabv3": 22.5},
    "cityscapes": {
        "FCN-32s": 71.7,
        "FPN": 82.0,
        "HC-FCN-32s": 87.2,
        "PSPNet": 298.7,
        "HC-PSPNet": 88.1,
        "Deeplabv3": 380.8,
        "HC-Deeplabv3": 93.9,
    },
}


def build(
    label: str,
    num_classes: int | None,
    options: InferenceOptions | None = None,
    device: str = "cpu",
    spec_update: Any = None,
) -> torch.nn.Module:
    """``label``'s model (random init, eval mode) on ``device``, with the inference ``options``.
    ``spec_update(spec) -> spec`` may shrink the model spec (``benchmarks/gpu.py --quick``)."""
    spec = dict(MODELS[label])
    if num_classes is not None:
        spec["num_classes"] = num_classes
    if spec_update is not None:
        spec = spec_update(spec)
    cfg = build_config({"model": spec})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    if device != "cpu":  # (under ``with torch.device("meta")`` it stays there)
        model = model.to(device)
    return apply_options(model, options or InferenceOptions(), inplace=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _paper_ratio(group: str, fast: str, slow: str) -> float | None:
    if (fast, slow) == ("HCFormer-R50", "MaskFormer-R50"):
        return 87 / 181  # Table 1 / III GFLOPs (the paper times no COCO model)
    ms = PAPER_MS.get(group, {})
    return ms[fast] / ms[slow] if fast in ms and slow in ms else None


def time_group(name: str, group: dict, args: argparse.Namespace) -> dict[str, Any]:
    h, w = group["size"]
    options, device = inference_options(args), args.device
    with torch.device("meta"):  # parameters of the plain models (folding adds conv biases)
        plain = {m: build(m, group["num_classes"]) for m in group["models"]}
    params = {m: sum(p.numel() for p in mod.parameters()) / 1e6 for m, mod in plain.items()}
    models = {m: build(m, group["num_classes"], options, device) for m in group["models"]}
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(1, 3, h, w, generator=g) * 255.0).to(device)
    wall: dict[str, list[float]] = {m: [] for m in models}
    cpu: dict[str, list[float]] = {m: [] for m in models}
    # Compiled models and CUDA graphs are made on the first call: always warm up then.
    warmup = group.get("warmup", True) or not options.plain
    start = time.perf_counter()
    with torch.inference_mode():
        if warmup:
            for mod in models.values():  # allocator and first-call costs
                mod(images)
        warm = time.perf_counter() - start
        rounds, max_rounds = 0, min(args.max_rounds, group.get("max_rounds", args.max_rounds))
        while rounds < max_rounds:
            for m, mod in models.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                mod(images)
                _sync(device)
                wall[m].append((time.perf_counter() - t0) * 1e3)
                cpu[m].append((time.process_time() - c0) * 1e3)
            rounds += 1
            spent = time.perf_counter() - start
            if rounds >= args.min_rounds and spent + (spent - warm) / rounds > args.budget_s:
                break
    med_wall = {m: statistics.median(t) for m, t in wall.items()}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    pairs = []
    on_wall = device.startswith("cuda")  # a GPU's time is not the process's CPU time
    for fast, slow, goal in group["pairs"]:
        ratio = (med_wall if on_wall else med_cpu)[fast] / (med_wall if on_wall else med_cpu)[slow]
        pairs.append(
            {
                "model": fast,
                "baseline": slow,
                "ratio_cpu": med_cpu[fast] / med_cpu[slow],
                "ratio_wall": med_wall[fast] / med_wall[slow],
                "ratio_on": "wall" if on_wall else "cpu",
                "goal": goal,
                "meets_goal": None if goal is None else ratio <= goal,
                "paper_ratio": _paper_ratio(name, fast, slow),
            }
        )
    how = "after a warm-up" if warmup else "(no warm-up)"
    took = time.perf_counter() - start
    print(f"\n{name} {h}x{w}: {rounds} interleaved round(s) {how}, {took:.0f} s")
    for m in models:
        paper = PAPER_MS.get(name, {}).get(m)
        also = f"  (paper GPU {paper} ms)" if paper else ""
        print(
            f"  {m:<24} cpu {med_cpu[m]:9.1f} ms  wall {med_wall[m]:9.1f} ms  "
            f"(median of {len(cpu[m])})  {params[m]:5.1f}M params{also}"
        )
    for p in pairs:
        paper = f"paper {p['paper_ratio']:.2f}x" if p["paper_ratio"] else ""
        goal = ""
        if p["goal"]:
            goal = f"goal <= {p['goal']:.2f}x: {'met' if p['meets_goal'] else 'MISSED'}"
        print(
            f"  {p['model']} / {p['baseline']} = {p['ratio_cpu']:.2f}x cpu "
            f"({p['ratio_wall']:.2f}x wall; goal on {p['ratio_on']})   {paper}   {goal}"
        )
    return {
        "size": [h, w],
        "rounds": rounds,
        "warmup": warmup,
        "wall_ms": wall,
        "cpu_ms": cpu,
        "median_wall_ms": med_wall,
        "median_cpu_ms": med_cpu,
        "params_m": params,
        "pairs": pairs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-clock budget per group")
    parser.add_argument("--min-rounds", type=int, default=2)
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/out/baselines_latency.json")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "device": args.device,
        "inference": dataclasses.asdict(inference_options(args)),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "groups": {name: time_group(name, GROUPS[name], args) for name in args.groups},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
