"""``hcformer budget``: the GPU-hours of the paper's campaign before submitting it.

    hcformer budget [--table ID|all] [--gpu-seconds-per-iter FILE ...] [--seeds 3] [--out JSON]

For every experiment a table needs, from its resolved paper-scale config (the paper's schedule,
App. D): ``solver.iterations``, ``solver.batch_size``, the training crop, and the GPUs of
``resources.gpus``; and a figure of GPU-seconds per iteration for its model family:

    GPU-hours of a run = iterations x figure x (batch / figure's batch)
                         x (f + (1 - f) x crop pixels / figure's crop pixels) / 3600

with ``f`` the fixed (not pixel-proportional) share of an iteration's cost. A run's wall-clock
time is its GPU-hours over its GPUs; a table costs the sum of its experiments times the seeds;
the campaign counts an experiment shared by several tables once.

The figures come from ``experiments/gpu_seconds_per_iter.yaml`` (measured ones with their
device, date and command; estimates with their derivation), overridden per family by files
given with ``--gpu-seconds-per-iter``: the same YAML format, or the JSON of ``hcformer
benchmark-train`` (one measured experiment). The output says which figures are measured and
which are estimates, and on what device.

Reads YAML/JSON only; imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from hcformer.config import Config
from hcformer.errors import ConfigError
from hcformer.experiments import all_experiments, experiments_dir, load_table, load_tables, resolve

DEFAULT_SEEDS = 3  # the paper trains every model three times (Sec. 4.1)
FIGURES_FILE = "gpu_seconds_per_iter.yaml"
FIGURE_KEYS = {
    "gpu_seconds_per_iter",
    "batch_size",
    "crop",
    "source",
    "device",
    "measured",
    "date",
    "command",
}


@dataclass
class Figure:
    """GPU-seconds per iteration of a model family at a batch size and crop."""

    family: str
    gpu_seconds_per_iter: float
    batch_size: int
    crop: tuple[int, int]
    source: str
    measured: bool
    device: str
    date: str = ""  # when a measured figure was taken
    command: str = ""  # the command that measured it


@dataclass
class Line:
    """The budget of one experiment (one run; ``gpu_hours_all_seeds`` for every seed)."""

    experiment: str
    tables: list[str]
    family: str
    iterations: int
    batch_size: int
    crop: tuple[int, int]
    gpus: int
    gpu_seconds_per_iter: float  # the family's figure scaled to this batch and crop
    gpu_hours: float
    wall_hours: float
    gpu_hours_all_seeds: float
    measured: bool


# --------------------------------------------------------------------------------------
# Figures.


def family_keys(cfg: Config) -> list[str]:
    """The figure keys for an experiment, most specific first: ``<backbone>/<head>``,
    ``<backbone>/os<stride>`` for a dilated backbone, then ``<backbone>``."""
    backbone, head = cfg.model.backbone, cfg.model.head
    keys = [f"{backbone.name}/{head.type}"]
    if backbone.output_stride != 32:
        keys.append(f"{backbone.name}/os{backbone.output_stride}")
    keys.append(backbone.name)
    return keys


def train_crop(cfg: Config) -> tuple[int, int]:
    """The training crop (H, W) of a config: the LSJ canvas or the scale-crop crop (App. D)."""
    data = cfg.data
    if data.augmentation == "lsj":
        return (data.lsj_size, data.lsj_size)
    return (int(data.crop[0]), int(data.crop[1]))


def _positive(value: Any, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return kind(value)


def _figure(family: str, raw: Any, where: str, measured: bool, device: str) -> Figure:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping with gpu_seconds_per_iter, batch_size, crop"
        )
    unknown = set(raw) - FIGURE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(FIGURE_KEYS)}")
    for key in ("gpu_seconds_per_iter", "batch_size", "crop"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    crop = raw["crop"]
    if not isinstance(crop, (list, tuple)) or len(crop) != 2:
        raise ConfigError(f"{where}.crop: expected [height, width], got {crop!r}")
    return Figure(
        family=family,
        gpu_seconds_per_iter=_positive(
            raw["gpu_seconds_per_iter"], f"{where}.gpu_seconds_per_iter"
        ),
        batch_size=_positive(raw["batch_size"], f"{where}.batch_size", int),
        crop=(_positive(crop[0], f"{where}.crop", int), _positive(crop[1], f"{where}.crop", int)),
        source=str(raw.get("source", "")),
        measured=bool(raw.get("measured", measured)),
        device=str(raw.get("device", device)),
        date=str(raw.get("date", "")),
        command=" ".join(str(raw.get("command", "")).split()),
    )


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: no such figures file")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{path}: not valid {path.suffix[1:].upper() or 'YAML'} ({exc})"
        ) from None


def load_figures(path: Path) -> tuple[dict[str, Figure], float | None]:
    """``({family: Figure}, fixed_fraction)`` of a figures file (YAML of the project's format,
    or the JSON of ``hcformer benchmark-train``)."""
    data = _read(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    if "figures" not in data:
        figure = _benchmark_figure(data, path)
        return {figure.family: figure}, None
    measured = bool(data.get("measured", False))
    device = str(data.get("device", "unknown"))
    figures = data["figures"]
    if not isinstance(figures, dict) or not figures:
        raise ConfigError(f"{path}: 'figures' must map model families to figures")
    out = {
        str(family): _figure(str(family), raw, f"{path}: figures.{family}", measured, device)
        for family, raw in figures.items()
    }
    fixed = data.get("fixed_fraction")
    if fixed is not None and (
        isinstance(fixed, bool) or not isinstance(fixed, (int, float)) or not 0 <= fixed < 1
    ):
        raise ConfigError(f"{path}: fixed_fraction must be a number in [0, 1), got {fixed!r}")
    return out, (float(fixed) if fixed is not None else None)


def _benchmark_figure(data: dict[str, Any], path: Path) -> Figure:
    """One measured figure from ``hcformer benchmark-train``'s JSON (``exp_id``, ``scale``,
    ``device``, ``batch``, ``input_size``, ``seconds_per_iteration`` on one device; ``gpus`` or
    ``world_size`` when several shared the batch)."""
    seconds = data.get("seconds_per_iteration", data.get("seconds_per_iter"))
    if seconds is None:
        raise ConfigError(
            f"{path}: neither a figures file ('figures:' mapping) nor a benchmark-train result "
            "('seconds_per_iteration')"
        )
    seconds = _positive(seconds, f"{path}: seconds_per_iteration")
    if data.get("scale", "paper") != "paper":
        raise ConfigError(
            f"{path}: measured at scale {data['scale']!r}; the budget needs the paper-scale model "
            "(hcformer benchmark-train --scale paper)"
        )
    gpus = _positive(data.get("gpus", data.get("world_size", 1)), f"{path}: gpus", int)
    device = str(data.get("device", "unknown"))
    batch = data.get("batch_size", data.get("batch"))
    crop = data.get("crop", data.get("input_size"))
    exp_id = data.get("experiment", data.get("exp_id"))
    if data.get("family"):
        family = str(data["family"])
    elif exp_id:
        cfg = resolve(str(exp_id), "paper")
        head = cfg.model.head.type
        family = cfg.model.backbone.name if head == "hcformer" else family_keys(cfg)[0]
        batch = batch if batch is not None else cfg.solver.batch_size
        crop = crop if crop is not None else list(train_crop(cfg))
    else:
        raise ConfigError(f"{path}: a benchmark result needs 'exp_id' (or 'family')")
    if batch is None or crop is None:
        raise ConfigError(f"{path}: a benchmark result needs 'batch' and 'input_size'")
    raw = {"gpu_seconds_per_iter": seconds * gpus, "batch_size": batch, "crop": crop}
    source = f"measured by hcformer benchmark-train ({path.name}) on {gpus} x {device}"
    return _figure(family, {**raw, "source": source}, str(path), True, device)


def figure_for(cfg: Config, figures: dict[str, Figure]) -> Figure:
    for key in family_keys(cfg):
        if key in figures:
            return figures[key]
    raise ConfigError(
        f"no GPU-seconds figure for model family {' or '.join(family_keys(cfg))}; the figures "
        f"file names: {', '.join(sorted(figures))}"
    )


# --------------------------------------------------------------------------------------
# The budget.


def scaled_seconds(figure: Figure, batch: int, crop: tuple[int, int], fixed: float) -> float:
    """The family's figure at ``batch`` images of ``crop`` (see the module docstring)."""
    pixels = crop[0] * crop[1] / (figure.crop[0] * figure.crop[1])
    return (
        figure.gpu_seconds_per_iter * (batch / figure.batch_size) * (fixed + (1 - fixed) * pixels)
    )


def budget_line(exp: Any, figure: Figure, fixed: float, seeds: int) -> Line:
    cfg = exp.config
    crop = train_crop(cfg)
    seconds = scaled_seconds(figure, cfg.solver.batch_size, crop, fixed)
    gpu_hours = cfg.solver.iterations * seconds / 3600.0
    gpus = max(int(cfg.resources.get("gpus", 1) or 1), 1)
    return Line(
        experiment=exp.id,
        tables=sorted({t for t, _ in exp.rows}),
        family=figure.family,
        iterations=cfg.solver.iterations,
        batch_size=cfg.solver.batch_size,
        crop=crop,
        gpus=gpus,
        gpu_seconds_per_iter=seconds,
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / gpus,
        gpu_hours_all_seeds=gpu_hours * seeds,
        measured=figure.measured,
    )


def campaign_budget(
    tables: list[str] | None, figure_files: list[Path], seeds: int = DEFAULT_SEEDS
) -> dict[str, Any]:
    """The budget as a JSON-ready dict: experiments, tables, totals, and the figures used."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    figures, fixed = load_figures(experiments_dir() / FIGURES_FILE)
    fixed = 0.0 if fixed is None else fixed
    for path in figure_files:
        extra, extra_fixed = load_figures(Path(path))
        figures.update(extra)
        fixed = fixed if extra_fixed is None else extra_fixed
    experiments = all_experiments("paper")
    chosen = [load_table(t) for t in tables] if tables else load_tables()
    per_table = {t.id: t.experiment_ids for t in chosen}
    ids = sorted({i for needed in per_table.values() for i in needed})
    lines = {i: budget_line(experiments[i], figure_for(experiments[i].config, figures), fixed,
                            seeds) for i in ids}  # fmt: skip
    used = sorted({line.family for line in lines.values()})
    measured = all(figures[f].measured for f in used)
    table_rows = [
        {
            "table": t,
            "experiments": len(needed),
            "runs": len(needed) * seeds,
            "gpu_hours": sum(lines[i].gpu_hours_all_seeds for i in needed),
        }
        for t, needed in per_table.items()
    ]
    return {
        "seeds": seeds,
        "tables": table_rows,
        "experiments": [asdict(line) for line in lines.values()],
        "total": {
            "experiments": len(lines),
            "runs": len(lines) * seeds,
            "gpu_hours": sum(line.gpu_hours_all_seeds for line in lines.values()),
        },
        "figures": {f: asdict(figures[f]) for f in used},
        "fixed_fraction": fixed,
        "measured": measured,
        "note": (
            "all figures measured"
            if measured
            else "ESTIMATES: figures marked estimate were not measured on your GPU (see each "
            "figure's source); measure them with `hcformer benchmark-train` and pass the result "
            "with --gpu-seconds-per-iter"
        ),
    }


def render(budget: dict[str, Any], detail: bool) -> str:
    lines = []
    if detail:
        width = max(len(e["experiment"]) for e in budget["experiments"])
        lines.append(
            f"{'experiment':<{width}}  {'iters':>8}  {'batch':>5}  {'crop':>9}  {'gpus':>4}  "
            f"{'GPU-s/it':>8}  {'GPU-h/run':>9}  {'days/run':>8}"
        )
        for e in budget["experiments"]:
            crop = f"{e['crop'][0]}x{e['crop'][1]}"
            lines.append(
                f"{e['experiment']:<{width}}  {e['iterations']:>8}  {e['batch_size']:>5}  "
                f"{crop:>9}  {e['gpus']:>4}  {e['gpu_seconds_per_iter']:>8.2f}  "
                f"{e['gpu_hours']:>9.0f}  {e['wall_hours'] / 24:>8.1f}"
            )
        lines.append("")
    seeds = budget["seeds"]
    lines.append(f"{'table':<10}  {'experiments':>11}  {'runs':>5}  GPU-hours ({seeds} seeds)")
    for t in budget["tables"]:
        lines.append(
            f"{t['table']:<10}  {t['experiments']:>11}  {t['runs']:>5}  {t['gpu_hours']:>10,.0f}"
        )
    total = budget["total"]
    lines.append(
        f"{'campaign':<10}  {total['experiments']:>11}  {total['runs']:>5}  "
        f"{total['gpu_hours']:>10,.0f}  (an experiment shared by tables counted once)"
    )
    lines += ["", "figures used (GPU-seconds per iteration, summed over GPUs):"]
    for family, f in budget["figures"].items():
        kind = "measured" if f["measured"] else "estimate"
        when = f", {f['date']}" if f["date"] else ""
        crop = f"{f['crop'][0]}x{f['crop'][1]}"
        lines.append(
            f"  {family}: {f['gpu_seconds_per_iter']:g} at batch {f['batch_size']}, {crop} "
            f"[{kind}: {f['device']}{when}]"
        )
        if f["command"]:
            lines.append(f"      command: {f['command']}")
        if f["source"]:
            lines.append(f"      source: {f['source']}")
    lines.append(
        f"  smaller crops: x ({budget['fixed_fraction']:g} + {1 - budget['fixed_fraction']:g} x "
        "pixel ratio)"
    )
    lines += ["", budget["note"]]
    return "\n".join(lines)
