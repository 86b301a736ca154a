"""``hcformer profile``: parameters, GFLOPs and latency of a paper table's rows, beside the paper's.

Counted as the paper counts (the authors' ``tools/analyze_model.py``;
:mod:`hcformer.analysis.flops`):

- ``params_m``: every parameter of the model, trainable and frozen, in millions (BatchNorm
  statistics are buffers, not parameters);
- ``gflops``: fvcore's convention (one multiply-add = one flop, element-wise ops ignored), model
  in eval mode, batch 1, post-processing included: the final masks decoded through the L
  clustering modules to stride 32 / 2**L (inside the model), resized once to the padded input,
  cropped and resized to the original image, and
  the semantic einsum of class and mask probabilities (semantic and panoptic tasks: Mask2Former's
  COCO panoptic config also produces the semantic view); instance inference adds only
  element-wise work. Inputs (:func:`profile_inputs`): COCO: the 100 val image sizes of
  ``coco_val_sizes.json`` resized to ``data.test_short`` / ``data.test_max`` and padded to 32,
  counted once per distinct size and weighted by its count; ADE20K: one ``data.crop`` square
  (512, 640 for Swin-L); Cityscapes: ``data.test_short`` x ``data.test_max`` (1024 x 2048);
  synthetic data (tiny, smoke): its one image size. Counting runs on ``meta`` tensors (nothing
  is computed; FakeTensorMode as a fallback);
- ``latency_ms`` (``--latency``): median wall time of model + post-processing over repeats
  after warm-up, real tensors, ``torch.inference_mode``, on the most frequent input size.

The JSON written by ``--out`` holds, per table row (and per run for table IV): ``label``,
``experiment``, ``column``, ``status`` (``ok``, ``quoted``, ``skipped``), ``reason``,
``params_m``, ``params_trainable_m``, ``gflops``, ``gflops_model``, ``gflops_postprocess``,
``gflops_by_op``, ``inputs`` ([{padded, resized, original, count}]), ``latency_ms``,
``latency_input``, ``paper`` ({params_m, gflops, latency_ms} the paper prints for the row) and
``diff`` (ours - paper for each of them), plus the table id, scale, device and versions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hcformer.analysis.flops import MacCount, count_macs
from hcformer.config import Config
from hcformer.errors import ConfigError, HCFormerError
from hcformer.experiments import Row, columns_of, load_table, resolve
from hcformer.models import build_model
from hcformer.models.postprocess import resize_to_original, semantic_inference, upsample_to_input

SIZE_DIVISIBILITY = 32


@dataclass(frozen=True)
class InputSize:
    """One evaluation input: the padded tensor the model sees, the resized image inside it, and
    the original size that post-processing resizes back to; ``count`` images share it."""

    padded: tuple[int, int]
    resized: tuple[int, int]
    original: tuple[int, int]
    count: int = 1


def _pad(size: int) -> int:
    return -(-size // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def resize_shortest_edge(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge at test time: short side to ``short``, long side at most
    ``max_size``, rounded to the nearest pixel."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def coco_val_sizes() -> list[tuple[int, int]]:
    """Original (height, width) of the 100 COCO val images the paper's FLOPs average over."""
    text = resources.files("hcformer.analysis").joinpath("coco_val_sizes.json").read_text()
    return [(int(h), int(w)) for h, w in json.loads(text)["sizes"]]


def profile_inputs(cfg: Config) -> list[InputSize]:
    """The evaluation inputs the paper counts FLOPs on, for ``cfg``'s dataset and test sizes.

    Synthetic data (the tiny/smoke scales) has one image size, ``data.synthetic.size``, resized
    and padded as the test transform does.
    """
    data = cfg.data
    if data.synthetic is not None:
        h, w = data.synthetic.size
        originals = [(h, w)]
    elif data.dataset in ("coco_panoptic", "coco_instance"):
        originals = coco_val_sizes()
    elif data.dataset == "ade20k":
        h, w = data.crop
        return [InputSize((_pad(h), _pad(w)), (h, w), (h, w))]
    else:  # cityscapes: the full 1024 x 2048 frame
        h, w = data.test_short, data.test_max
        return [InputSize((_pad(h), _pad(w)), (h, w), (h, w))]
    groups: collections.Counter[InputSize] = collections.Counter()
    for h, w in originals:
        rh, rw = resize_shortest_edge(h, w, data.test_short, data.test_max)
        groups[InputSize((_pad(rh), _pad(rw)), (rh, rw), (h, w))] += 1
    return [
        dataclasses.replace(size, count=n)
        for size, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0].padded, kv[0].original))
    ]


# --------------------------------------------------------------------------------------
# Counting.


def _build(cfg: Config, device: str):
    """The model of ``cfg`` without pretrained weights (they change no count), in eval mode."""
    model_cfg = dataclasses.replace(
        cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained="")
    )
    with torch.device(device):
        model = build_model(model_cfg)
    return model.eval()


def postprocess(outputs: dict[str, Any], cfg: Config, size: InputSize) -> Any:
    """The inference post-processing of one image whose FLOPs the paper counts (see module doc)."""
    if "sem_logits" in outputs:  # per-pixel models
        logits = upsample_to_input(outputs["sem_logits"][:1], size.padded)
        return resize_to_original(logits[0], size.resized, size.original)
    masks = upsample_to_input(outputs["pred_masks"][:1], size.padded)
    masks = resize_to_original(masks[0], size.resized, size.original)
    if cfg.data.task in ("semantic", "panoptic"):
        return semantic_inference(outputs["pred_logits"][0], masks)
    return masks


def _count_on(model, cfg: Config, sizes: list[InputSize], device: str) -> tuple[dict, dict]:
    """Weighted-average multiply-adds of the model and of post-processing over ``sizes``."""
    total = sum(s.count for s in sizes)
    model_macs, post_macs = MacCount(), MacCount()
    by_padded: dict[tuple[int, int], list[InputSize]] = {}
    for size in sizes:
        by_padded.setdefault(size.padded, []).append(size)
    with torch.no_grad():
        for padded, group in by_padded.items():
            images = torch.zeros((1, 3, *padded), device=device)
            with count_macs() as macs:
                outputs = model(images)
            weight = sum(s.count for s in group)
            model_macs.add(MacCount({k: v * weight for k, v in macs.by_op.items()}))
            for size in group:
                with count_macs() as macs:
                    postprocess(outputs, cfg, size)
                post_macs.add(MacCount({k: v * size.count for k, v in macs.by_op.items()}))
    return model_macs.scaled(1 / total), post_macs.scaled(1 / total)


def count_flops(cfg: Config, sizes: list[InputSize] | None = None) -> dict[str, Any]:
    """Parameters and fvcore-convention GFLOPs of ``cfg``'s model, counted on ``meta`` tensors
    (shapes only, nothing computed; under FakeTensorMode if an op lacks a meta kernel)."""
    sizes = sizes or profile_inputs(cfg)
    device = "meta"
    model = _build(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)  # FlopCounterMode's module tracker needs no autograd hooks
    try:
        model_macs, post_macs = _count_on(model, cfg, sizes, device)
    except (RuntimeError, NotImplementedError):
        # An op without a meta kernel (or a device-type check): count under FakeTensorMode with
        # uninitialised CPU parameters instead (same shapes, slower).
        device = "fake"
        model = model.to_empty(device="cpu")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model_macs, post_macs = _count_on(model, cfg, sizes, "cpu")
    by_op = collections.Counter()
    for part in (model_macs, post_macs):
        by_op.update(part)
    del model
    return {
        "params_m": params / 1e6,
        "params_trainable_m": trainable / 1e6,
        "gflops": sum(by_op.values()) / 1e9,
        "gflops_model": sum(model_macs.values()) / 1e9,
        "gflops_postprocess": sum(post_macs.values()) / 1e9,
        "counted_on": device,
        "gflops_by_op": {op: n / 1e9 for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "inputs": [
            {
                "padded": list(s.padded),
                "resized": list(s.resized),
                "original": list(s.original),
                "count": s.count,
            }  # fmt: skip
            for s in sizes
        ],
    }


def measure_latency(
    cfg: Config, size: InputSize, *, device: str = "cpu", warmup: int = 2, repeats: int = 5
) -> float:
    """Median milliseconds of model + post-processing of one image (real tensors)."""
    model = _build(cfg, "cpu").to(device)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand((1, 3, *size.padded), generator=generator) * 255).to(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            postprocess(model(images), cfg, size)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# A table.


def _paper_and_diff(row: Row, ours: dict[str, Any]) -> tuple[dict, dict]:
    paper = {c: row.values.get(c) for c in columns_of("profile") if c in row.values}
    diff = {
        c: (ours[c] - v if isinstance(v, (int, float)) and ours.get(c) is not None else None)
        for c, v in paper.items()
    }
    return paper, diff


def profile_table(
    table_id: str,
    scale: str = "paper",
    *,
    rows: list[str] | None = None,
    latency: bool = False,
    device: str = "cpu",
    repeats: int = 5,
    log=None,
    cache: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Profile every buildable row of a table (``rows``: only these labels). ``cache`` (experiment
    id -> result) may be shared between calls of the same scale to count each model once."""
    table = load_table(table_id)
    labels = [r.label for r in table.rows]
    unknown = [label for label in rows or [] if label not in labels]
    if unknown:
        raise ConfigError(
            f"table {table_id}: unknown rows {unknown}; rows: {', '.join(map(repr, labels))}"
        )
    cache = {} if cache is None else cache
    entries = []
    for row in table.rows:
        if rows and row.label not in rows:
            continue
        base = {"label": row.label, "quoted": row.quoted, "source": row.source}
        if not row.runs:
            paper, _ = _paper_and_diff(row, {})
            entries.append({**base, "experiment": None, "column": None, "status": "quoted",
                            "reason": "quoted from " + row.source, "paper": paper, "diff": {}})  # fmt: skip
            continue
        for run in row.runs:
            exp_id = run.experiment_id
            if exp_id not in cache or (latency and "latency_ms" not in cache[exp_id]):
                cfg = resolve(exp_id, scale)
                started = time.perf_counter()
                try:
                    result = {"status": "ok", "reason": "", **count_flops(cfg)}
                except HCFormerError as exc:
                    if not row.requires:
                        raise
                    result = {"status": "skipped", "reason": f"requires {row.requires}: {exc}"}
                if latency and result["status"] == "ok":
                    size = max(profile_inputs(cfg), key=lambda s: s.count)
                    result["latency_ms"] = measure_latency(
                        cfg, size, device=device, repeats=repeats
                    )
                    result["latency_input"] = list(size.padded)
                result["seconds"] = time.perf_counter() - started
                cache[exp_id] = result
                if log:
                    log(f"  {exp_id}: {result.get('gflops', float('nan')):.1f} GFLOPs "
                        f"({result['seconds']:.0f} s)")  # fmt: skip
            result = cache[exp_id]
            paper, diff = _paper_and_diff(row, result)
            entries.append({**base, "experiment": exp_id, "column": run.column, **result,
                            "paper": paper, "diff": diff})  # fmt: skip
    return {
        "table": table.id,
        "title": table.title,
        "scale": scale,
        "convention": "fvcore: one multiply-add = one flop; element-wise ops ignored; eval mode, "
        "batch 1, post-processing included; params = all parameters (BN statistics are buffers)",
        "device": device if latency else None,
        "torch": torch.__version__,
        "rows": entries,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """A readable table: ours, the paper's, and the difference, per row."""
    head = ["row", "experiment", "params_m", "paper", "diff", "gflops", "paper", "diff", "rel"]
    if any("latency_ms" in e for e in result["rows"]):
        head += ["latency_ms", "paper"]
    lines = [head]
    for e in result["rows"]:
        paper, diff = e.get("paper", {}), e.get("diff", {})
        label = e["label"] + (f" [{e['column']}]" if e.get("column") else "")
        if e["status"] != "ok":
            lines.append([label, e.get("experiment") or e["status"], "-", _fmt(paper.get("params_m")),
                          "-", "-", _fmt(paper.get("gflops")), "-", "-"])  # fmt: skip
            continue
        gdiff, gpaper = diff.get("gflops"), paper.get("gflops")
        rel = f"{100 * gdiff / gpaper:+.0f}%" if gdiff is not None and gpaper else "-"
        line = [label, e["experiment"], _fmt(e["params_m"], 2), _fmt(paper.get("params_m")),
                "-" if diff.get("params_m") is None else f"{diff['params_m']:+.2f}",
                _fmt(e["gflops"]), _fmt(gpaper),
                "-" if gdiff is None else f"{gdiff:+.1f}", rel]  # fmt: skip
        if "latency_ms" in e:
            line += [_fmt(e["latency_ms"]), _fmt(paper.get("latency_ms"))]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines if i < len(line)) for i in range(len(head))]
    out = [f"{result['table']}: {result['title']} (scale {result['scale']})"]
    for line in lines:
        out.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))))  # fmt: skip
    return "\n".join(out)
