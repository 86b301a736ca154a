"""The paper's tables as data: table rows -> unique experiments with canonical ids.

``experiments/tables/<id>.yaml`` names the rows of one table of arXiv:2205.09949v3. A row is
either quoted from another paper (``quoted: true`` + ``source:``) or a set of dotted overrides
(``set:``) on the dataset's base config ``experiments/base/<dataset>.yaml``; table IV's rows
combine three runs, one per dataset column (``runs:``). A config is resolved as

    base/<dataset>.yaml -> the backbone's paper settings (its entry in hcformer.families:
    ImageNet weights, drop path) -> table ``defaults:`` -> row ``set:``
    -> scale overlay (common, dataset, the backbone entries' tiny shrink with
       ``tiny_backbones: true``, backbone, head sections) -> row ``schedule:`` multiplier
       (of ``solver.iterations`` and of the decay steps given as iteration numbers)
    -> normalisation (dcnv2 is irrelevant where no clustering module sits, e.g. at L0)

Identical resolved configs are one experiment, trained once and shared by every row that uses
it. Its id is derived from the paper-scale resolved config, e.g.
``coco_panoptic/hcformer-r50-L3-D8-Q100``: readable, scale-independent, and unique (names that
would collide get a short hash of the config appended).

``hcformer experiments [--table ID] [--scale S] [--json]`` lists them
(:mod:`hcformer.commands.experiments`). This module imports only ``hcformer.config``,
``hcformer.families`` and ``hcformer.errors`` (no torch): the Snakefile and the submitting
process import it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcformer.config import (
    BackboneConfig,
    Config,
    build_config,
    flatten,
    load_yaml,
    merge,
    to_dict,
)
from hcformer.errors import ConfigError
from hcformer.families import BACKBONES, backbone_entry, head_entry

# Keys a paper table varies: a scale overlay must never set them (docs/interfaces.md).
VARIED_KEYS = (
    "model.backbone.name",
    "model.backbone.hierarchy_level",
    "model.backbone.dcnv2",
    "model.backbone.output_stride",
    "model.head.type",
    "model.head.decoder",
    "model.head.decoder_layers",
    "model.head.queries",
    "model.head.encoder_layers",
)

TABLE_KEYS = {"title", "dataset", "columns", "defaults", "figure", "rows"}
COLUMN_KEYS = {"kind", "latex", "plain", "axis", "scale"}
COLUMN_KINDS = ("metric", "profile", "setting")
PAPER_TABLE_KEYS = {"source", "rows"}  # a table of paper_values.yaml

ROW_KEYS = {"label", "set", "quoted", "source", "requires", "schedule", "runs"}
RUN_KEYS = {"dataset", "metric", "set", "schedule"}
OVERLAY_KEYS = {
    "extends",
    "common",
    "dataset",
    "tiny_backbones",
    "backbone",
    "head",
    "schedule_multiplier",
}


def experiments_dir() -> Path:
    """The ``experiments/`` folder: ``$HCFORMER_EXPERIMENTS`` or the one beside the package."""
    env = os.environ.get("HCFORMER_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"


# --------------------------------------------------------------------------------------
# Data classes of the registry.


@dataclass(frozen=True)
class Column:
    """A column of the paper's tables, as ``experiments/columns.yaml`` describes it."""

    key: str
    kind: str  # metric (the runs' median), profile (hcformer profile), setting (the row's)
    latex: str  # the title in the LaTeX tables
    plain: str  # the title in plain text (figure axes and legends)
    axis: str = ""  # a setting a figure plots: "x" (its x axis) or "hue" (its colours)
    scale: str = ""  # of an x axis: "log2"


@dataclass(frozen=True)
class Run:
    """One experiment a table row needs: the base dataset, overrides and the column it feeds."""

    dataset: str
    overrides: dict[str, Any]
    schedule: float = 1.0  # multiplies solver.iterations after the scale overlay
    column: str | None = None  # table IV: the dataset column this run fills (None: all columns)
    metric: str | None = None  # table IV: the metric read from the run (e.g. pq for coco_pq)
    experiment_id: str = ""


@dataclass(frozen=True)
class Row:
    """A row of a paper table. ``values`` are the paper's numbers (paper_values.yaml)."""

    table: str
    label: str
    values: dict[str, Any]
    runs: tuple[Run, ...] = ()
    quoted: bool = False  # quoted from another paper; with ``runs`` we ALSO train our own
    source: str = ""
    requires: str = ""  # "baselines": trains a baseline (MaskFormer, per-pixel); skip_requires

    @property
    def experiment_ids(self) -> list[str]:
        return [run.experiment_id for run in self.runs]


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    dataset: str | None  # None for table IV (one run per dataset column)
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    path: Path
    figure: bool = False  # the table has a figure of its ablation (hcformer figures)
    kinds: dict[str, str] = field(default_factory=dict)  # column -> metric, profile or setting

    @property
    def experiment_ids(self) -> list[str]:
        """The experiments the table needs, each once, in row order (quoted rows need none)."""
        return list(dict.fromkeys(i for row in self.rows for i in row.experiment_ids))

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise ConfigError(
            f"table {self.id}: no row {label!r}; rows: {', '.join(r.label for r in self.rows)}"
        )


@dataclass
class Experiment:
    """A unique resolved config and the ``(table_id, row_label)`` pairs that use it."""

    id: str
    dataset: str
    config: Config  # resolved at the scale it was asked for
    rows: list[tuple[str, str]] = field(default_factory=list)
    requires: str = ""

    @property
    def name(self) -> str:
        """The id without its dataset prefix (the run folder is runs/<dataset>/<name>/)."""
        return self.id.split("/", 1)[1]


# --------------------------------------------------------------------------------------
# Loading the YAML files.


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted keys, got {value!r}")
    return value


def _schedule(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: schedule must be a positive number, got {value!r}")
    return float(value)


@functools.lru_cache(maxsize=4)
def _paper_values(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "paper_values.yaml"
    data = load_yaml(path).get("tables")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a 'tables' mapping of table id -> rows")
    for table_id, table in data.items():
        unknown = set(_mapping(table, f"{path}: tables.{table_id}")) - PAPER_TABLE_KEYS
        if unknown:
            raise ConfigError(
                f"{path}: tables.{table_id}: unknown keys {sorted(unknown)}; the file holds the "
                f"paper's numbers and their source only ({', '.join(sorted(PAPER_TABLE_KEYS))}): "
                f"a table's title and columns live in tables/{table_id}.yaml"
            )
    return data


@functools.lru_cache(maxsize=4)
def _columns(root: Path) -> dict[str, Column]:
    path = root / "columns.yaml"
    data = load_yaml(path).get("columns")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a 'columns' mapping of column key -> description")
    out = {}
    for key, spec in data.items():
        spec = _mapping(spec, f"{path}: {key}")
        unknown = set(spec) - COLUMN_KEYS
        if unknown:
            raise ConfigError(
                f"{path}: {key}: unknown keys {sorted(unknown)}; valid: {sorted(COLUMN_KEYS)}"
            )
        if spec.get("kind") not in COLUMN_KINDS or not spec.get("latex") or not spec.get("plain"):
            raise ConfigError(
                f"{path}: {key}: needs 'kind' (one of {', '.join(COLUMN_KINDS)}), 'latex' and "
                f"'plain'; got {spec}"
            )
        axis, scale = spec.get("axis", ""), spec.get("scale", "")
        if axis not in ("", "x", "hue") or scale not in ("", "log2"):
            raise ConfigError(f"{path}: {key}: 'axis' is x or hue, 'scale' is log2; got {spec}")
        out[str(key)] = Column(key=str(key), **{k: str(v) for k, v in spec.items()})
    return out


def columns(root: str | Path | None = None) -> dict[str, Column]:
    """Every column a table may have, by key, in the order of ``experiments/columns.yaml``."""
    return _columns(Path(root) if root else experiments_dir())


def columns_of(kind: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The keys of the columns of one kind (metric, profile, setting), in the file's order."""
    return tuple(key for key, column in columns(root).items() if column.kind == kind)


def x_columns(root: str | Path | None = None) -> tuple[str, ...]:
    """The settings a figure can put on its x axis, in the order a table's is looked for."""
    return tuple(key for key, column in columns(root).items() if column.axis == "x")


_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9}


def table_sort_key(table_id: str) -> tuple[int, int, str]:
    """The paper's order: table1..table6, then the appendix tableI_a, tableI_b, tableII..."""
    rest = table_id.removeprefix("table")
    number, _, part = rest.partition("_")
    if number.isdigit():
        return (0, int(number), part)
    return (1, _ROMAN.get(number, 99), part or rest)


def _dataset_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "base").glob("*.yaml") if p.stem != "backbones")


def _parse_row(raw: Any, index: int, path: Path, tdata: dict[str, Any]) -> dict:
    where = f"{path}: rows[{index}]"
    if not isinstance(raw, dict) or "label" not in raw:
        raise ConfigError(f"{where}: expected a mapping with a 'label'")
    unknown = set(raw) - ROW_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(ROW_KEYS)}")
    label = str(raw["label"])
    where = f"{path}: row {label!r}"
    quoted = bool(raw.get("quoted", False))
    if quoted and not raw.get("source"):
        raise ConfigError(f"{where}: a quoted row needs a 'source' (the paper it quotes)")
    defaults = _mapping(tdata.get("defaults"), f"{path}: defaults")
    runs: list[Run] = []
    if "runs" in raw:
        if "set" in raw:
            raise ConfigError(f"{where}: give either 'set' or 'runs', not both")
        for column, spec in _mapping(raw["runs"], f"{where}: runs").items():
            spec = _mapping(spec, f"{where}: runs.{column}")
            unknown = set(spec) - RUN_KEYS
            if unknown or "dataset" not in spec or "metric" not in spec:
                raise ConfigError(
                    f"{where}: runs.{column} needs 'dataset' and 'metric' (and optional 'set', "
                    f"'schedule'); got keys {sorted(spec)}"
                )
            runs.append(
                Run(
                    dataset=str(spec["dataset"]),
                    overrides={**defaults, **_mapping(spec.get("set"), f"{where}: runs.{column}")},
                    schedule=_schedule(spec.get("schedule", 1), f"{where}: runs.{column}"),
                    column=str(column),
                    metric=str(spec["metric"]),
                )
            )
    elif "set" in raw or not quoted:
        dataset = tdata.get("dataset")
        if not dataset:
            raise ConfigError(f"{where}: the table has no 'dataset'; give the row 'runs:'")
        runs.append(
            Run(
                dataset=str(dataset),
                overrides={**defaults, **_mapping(raw.get("set"), f"{where}: set")},
                schedule=_schedule(raw.get("schedule", 1), where),
            )
        )
    return {
        "label": label,
        "runs": runs,
        "quoted": quoted,
        "source": str(raw.get("source", "")),
        "requires": str(raw.get("requires", "")),
    }


@functools.lru_cache(maxsize=4)
def _load_tables(root: Path) -> tuple[Table, ...]:
    tables_dir = root / "tables"
    paths = sorted(tables_dir.glob("*.yaml"), key=lambda p: table_sort_key(p.stem))
    if not paths:
        raise ConfigError(
            f"{tables_dir}: no table files (<table_id>.yaml); set HCFORMER_EXPERIMENTS to the "
            "project's experiments/ folder"
        )
    values = _paper_values(root)
    datasets = _dataset_names(root)
    known = _columns(root)
    parsed_tables = []
    for path in paths:
        table_id = path.stem
        tdata = load_yaml(path)
        for key in ("title", "columns", "rows"):
            if key not in tdata:
                raise ConfigError(f"{path}: missing key {key!r}")
        unknown = set(tdata) - TABLE_KEYS
        if unknown:
            raise ConfigError(
                f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(TABLE_KEYS)}"
            )
        for column in tdata["columns"]:
            if column not in known:
                raise ConfigError(
                    f"{path}: column {column!r} is not in {root / 'columns.yaml'}; known "
                    f"columns: {', '.join(known)}"
                )
        if not isinstance(tdata.get("figure", False), bool):
            raise ConfigError(f"{path}: figure must be true or false, got {tdata['figure']!r}")
        if tdata.get("figure") and not set(tdata["columns"]) & set(x_columns(root)):
            raise ConfigError(
                f"{path}: a figure needs a column to plot against (axis: x in "
                f"{root / 'columns.yaml'}: {', '.join(x_columns(root))})"
            )
        dataset = tdata.get("dataset")
        if dataset is not None and dataset not in datasets:
            raise ConfigError(f"{path}: dataset {dataset!r} is not one of {datasets}")
        if table_id not in values:
            raise ConfigError(
                f"{path}: table {table_id!r} has no values in {root / 'paper_values.yaml'}"
            )
        paper_rows = {r["label"]: r for r in values[table_id].get("rows", [])}
        rows = [_parse_row(raw, i, path, tdata) for i, raw in enumerate(tdata["rows"])]
        labels = [r["label"] for r in rows]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise ConfigError(f"{path}: duplicate row labels {dupes}")
        for row in rows:
            if row["label"] not in paper_rows:
                raise ConfigError(
                    f"{path}: row {row['label']!r} has no values in paper_values.yaml table "
                    f"{table_id}; labels there: {', '.join(paper_rows)}"
                )
            given = set(paper_rows[row["label"]]) - {"label"}
            if given != set(tdata["columns"]):
                raise ConfigError(
                    f"{root / 'paper_values.yaml'}: table {table_id}, row {row['label']!r}: "
                    f"values of {sorted(given)}; expected one for each column of {path.name}: "
                    f"{', '.join(tdata['columns'])} (null where the paper prints '-')"
                )
            for run in row["runs"]:
                if run.dataset not in datasets:
                    raise ConfigError(
                        f"{path}: row {row['label']!r}: dataset {run.dataset!r} is not one of "
                        f"{datasets}"
                    )
        orphans = [label for label in paper_rows if label not in labels]
        if orphans:
            raise ConfigError(
                f"{root / 'paper_values.yaml'}: table {table_id}: rows {orphans} have no row in "
                f"{path}"
            )
        parsed_tables.append((table_id, path, tdata, paper_rows, rows))

    # Ids come from the paper-scale configs of all tables at once (collisions need them all).
    paper = {
        id(run): _resolve_run(root, run, "paper")
        for *_, rows in parsed_tables
        for row in rows
        for run in row["runs"]
    }
    ids = _assign_ids({config_hash(cfg): cfg for cfg in paper.values()})
    tables = []
    for table_id, path, tdata, paper_rows, rows in parsed_tables:
        built = []
        for row in rows:
            runs = tuple(
                dataclasses.replace(run, experiment_id=ids[config_hash(paper[id(run)])])
                for run in row["runs"]
            )
            row_values = {
                k: v for k, v in paper_rows[row["label"]].items() if k in tdata["columns"]
            }
            built.append(Row(table=table_id, values=row_values, **{**row, "runs": runs}))
        tables.append(
            Table(
                id=table_id,
                title=str(tdata["title"]),
                dataset=tdata.get("dataset"),
                columns=tuple(tdata["columns"]),
                rows=tuple(built),
                path=path,
                figure=bool(tdata.get("figure", False)),
                kinds={c: known[c].kind for c in tdata["columns"]},
            )
        )
    return tuple(tables)


def load_tables(root: str | Path | None = None) -> list[Table]:
    """Every table of ``experiments/tables/``, rows linked to their paper values and ids."""
    return list(_load_tables(Path(root) if root else experiments_dir()))


def load_table(table_id: str, root: str | Path | None = None) -> Table:
    tables = {t.id: t for t in load_tables(root)}
    if table_id not in tables:
        raise ConfigError(f"unknown table {table_id!r}; valid tables: {', '.join(tables)}")
    return tables[table_id]


# --------------------------------------------------------------------------------------
# Scale overlays.


def scales(root: str | Path | None = None) -> tuple[str, ...]:
    """The scales, sorted: one per overlay file ``experiments/scales/<scale>.yaml`` (every
    ``--scale`` option and the workflow's config check offer these)."""
    folder = (Path(root) if root else experiments_dir()) / "scales"
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def _check_overlay_keys(section: dict[str, Any], where: str) -> None:
    for key in flatten(merge({}, section)):
        for varied in VARIED_KEYS:
            if key == varied or key.startswith(varied + ".") or varied.startswith(key + "."):
                raise ConfigError(
                    f"{where}: sets {key!r}, a key that a paper table varies; scale overlays "
                    f"must never change {', '.join(VARIED_KEYS)}"
                )


@functools.lru_cache(maxsize=16)
def _load_overlay(root: Path, scale: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The overlay of ``scale`` as {common, dataset, tiny_backbones, backbone, head,
    schedule_multiplier}."""
    path = root / "scales" / f"{scale}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(scales(root))}")
    data = load_yaml(path)
    unknown = set(data) - OVERLAY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(OVERLAY_KEYS)}")
    out: dict[str, Any] = {"common": {}, "dataset": {}, "backbone": {}, "head": {}}
    if data.get("extends"):
        parent = str(data["extends"])
        if parent in _seen + (scale,):
            raise ConfigError(f"{path}: 'extends' forms a cycle through {parent!r}")
        out = _load_overlay(root, parent, _seen + (scale,))
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}
    out["common"] = merge(out["common"], _mapping(data.get("common"), f"{path}: common"))
    _check_overlay_keys(out["common"], f"{path}: common")
    for section in ("dataset", "backbone", "head"):
        for name, keys in _mapping(data.get(section), f"{path}: {section}").items():
            where = f"{path}: {section}.{name}"
            keys = _mapping(keys, where)
            _check_overlay_keys(keys, where)
            out[section][name] = merge(out[section].get(name, {}), keys)
    multiplier = data.get("schedule_multiplier", out.get("schedule_multiplier", True))
    if not isinstance(multiplier, bool):
        raise ConfigError(f"{path}: schedule_multiplier must be true or false")
    out["schedule_multiplier"] = multiplier
    tiny = data.get("tiny_backbones", out.get("tiny_backbones", False))
    if not isinstance(tiny, bool):
        raise ConfigError(f"{path}: tiny_backbones must be true or false")
    out["tiny_backbones"] = tiny
    return out


def apply_overlay(cfg: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Apply a loaded scale overlay to a nested config dict (common, dataset, the backbone
    entry's tiny shrink where the overlay asks for it, backbone, head)."""
    out = merge(cfg, overlay["common"])
    out = merge(out, overlay["dataset"].get(out["data"]["dataset"], {}))
    name = out["model"]["backbone"]["name"]
    if overlay["tiny_backbones"]:
        shrink = {"model": {"backbone": dict(backbone_entry(name).tiny)}}
        _check_overlay_keys(shrink, f"hcformer.families: BACKBONES[{name!r}].tiny")
        out = merge(out, shrink)
    out = merge(out, overlay["backbone"].get(name, {}))
    return merge(out, overlay["head"].get(out["model"]["head"]["type"], {}))


# --------------------------------------------------------------------------------------
# Resolution and ids.


def normalise(cfg: Config) -> Config:
    """Canonical form: DCNv2 only exists where a ResNet downsampling carries a clustering module
    (App. E.2), so at hierarchy level 0 and for Swin the flag is irrelevant and set to the
    default; table II's two L0 rows are then one experiment."""
    backbone = cfg.model.backbone
    if backbone.hierarchy_level == 0 or not backbone_entry(backbone.name).family.dcnv2:
        default = type(backbone)().dcnv2
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(
                cfg.model, backbone=dataclasses.replace(backbone, dcnv2=default)
            ),
        )
    return cfg


@functools.lru_cache(maxsize=64)
def _cached_yaml(path: Path) -> dict[str, Any]:
    return load_yaml(path)  # never mutated: merge() copies


def _resolve_run(root: Path, run: Run, scale: str = "paper") -> Config:
    base_path = root / "base" / f"{run.dataset}.yaml"
    data = _cached_yaml(base_path)
    name = merge(data, run.overrides).get("model", {}).get("backbone", {}).get("name")
    entry = BACKBONES.get(name or BackboneConfig().name)
    if entry is not None:  # an unknown name fails below, in build_config, naming the valid ones
        data = merge(data, entry.paper_settings())
    data = merge(data, run.overrides)
    try:
        cfg_dict = to_dict(build_config(data))
    except ConfigError as exc:
        raise ConfigError(f"{base_path} with overrides {run.overrides}: {exc}") from None
    overlay = _load_overlay(root, scale)
    resolved = apply_overlay(cfg_dict, overlay)
    if overlay["schedule_multiplier"] and run.schedule != 1.0:
        solver = resolved["solver"]
        solver["iterations"] = round(solver["iterations"] * run.schedule)
        # Decay points given as iteration numbers (above 1) scale with the schedule, as the
        # authors' 100 / 200 epoch configs double / quadruple their 50 epoch SOLVER.STEPS.
        solver["steps"] = [s if s <= 1 else float(round(s * run.schedule)) for s in solver["steps"]]
    try:
        cfg = build_config(resolved)
    except ConfigError as exc:
        raise ConfigError(f"{root / 'scales' / (scale + '.yaml')}: {exc}") from None
    before, after = flatten(cfg_dict), flatten(to_dict(cfg))
    for key in VARIED_KEYS:  # belt and braces: the overlay checks should make this impossible
        if before[key] != after[key]:
            raise ConfigError(f"scale {scale!r} changed {key} from {before[key]} to {after[key]}")
    return normalise(cfg)


def readable_name(cfg: Config) -> str:
    """``<dataset>/<model>-<backbone>-L<k>-D<d>-Q<q>[-nodcn][-plus][-std]`` (per-pixel models:
    ``<head>-<backbone>-os<s>`` when dilated, else ``-L<k>``)."""
    backbone, head = cfg.model.backbone, cfg.model.head
    family = backbone_entry(backbone.name).family
    parts = [head.type, backbone_entry(backbone.name).token]
    if head_entry(head.type).kind == "mask":
        if head.type == "hcformer" or backbone.hierarchy_level:
            parts.append(f"L{backbone.hierarchy_level}")
        parts += [f"D{head.decoder_layers}", f"Q{head.queries}"]
    elif backbone.output_stride != 32:
        parts.append(f"os{backbone.output_stride}")
    else:
        parts.append(f"L{backbone.hierarchy_level}")
    if family.dcnv2 and backbone.hierarchy_level and not backbone.dcnv2:
        parts.append("nodcn")
    if head.encoder_layers == 6:
        parts.append("plus")
    elif head.encoder_layers:
        parts.append(f"E{head.encoder_layers}")
    if head.type == "hcformer" and head.decoder == "standard":
        parts.append("std")
    return f"{cfg.data.dataset}/" + "-".join(parts)


def config_hash(cfg: Config) -> str:
    """A short, stable hash of a resolved config (sorted JSON of its plain-dict form)."""
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:7]


def _assign_ids(configs: dict[str, Config]) -> dict[str, str]:
    """Map config hash -> unique id: a readable name shared by different configs gets
    ``-h<hash>`` appended for every config in the collision (so no order dependence)."""
    by_name: dict[str, set[str]] = {}
    for digest, cfg in configs.items():
        by_name.setdefault(readable_name(cfg), set()).add(digest)
    ids = {}
    for name, digests in by_name.items():
        for digest in digests:
            ids[digest] = name if len(digests) == 1 else f"{name}-h{digest}"
    return ids


@functools.lru_cache(maxsize=4)
def _uses(root: Path) -> dict[str, list[tuple[Table, Row, Run]]]:
    """Experiment id -> every (table, row, run) that uses it."""
    uses: dict[str, list[tuple[Table, Row, Run]]] = {}
    for table in _load_tables(root):
        for row in table.rows:
            for run in row.runs:
                uses.setdefault(run.experiment_id, []).append((table, row, run))
    return uses


@functools.lru_cache(maxsize=64)
def _experiment(root: Path, scale: str, exp_id: str) -> Experiment:
    """Experiment ``exp_id`` (a key of :func:`_uses`) resolved at ``scale``."""
    users = _uses(root)[exp_id]
    configs = [_resolve_run(root, run, scale) for _, _, run in users]
    if len({config_hash(c) for c in configs}) > 1:
        rows = ", ".join(f"{t.id}:{r.label}" for t, r, _ in users)
        raise ConfigError(
            f"experiment {exp_id}: rows {rows} are identical at paper scale but differ at "
            f"scale {scale!r} (a row's schedule or overrides interact with the overlay)"
        )
    return Experiment(
        id=exp_id,
        dataset=users[0][2].dataset,
        config=configs[0],
        rows=list(dict.fromkeys((t.id, r.label) for t, r, _ in users)),
        requires=next((r.requires for _, r, _ in users if r.requires), ""),
    )


def _all_experiments(root: Path, scale: str) -> dict[str, Experiment]:
    return {exp_id: _experiment(root, scale, exp_id) for exp_id in sorted(_uses(root))}


def pretrained_weights(scale: str = "paper", dataset: str | None = None) -> dict[str, list[str]]:
    """Each ``model.backbone.pretrained`` value the experiments of ``scale`` (on ``dataset``,
    when given) start from -> the ids of those experiments (what ``hcformer fetch-weights``
    downloads and ``hcformer check-data`` looks for)."""
    users: dict[str, list[str]] = {}
    for exp in all_experiments(scale).values():
        if dataset and exp.dataset != dataset:
            continue
        if exp.config.model.backbone.pretrained:
            users.setdefault(exp.config.model.backbone.pretrained, []).append(exp.id)
    return users


def all_experiments(scale: str = "paper", root: str | Path | None = None) -> dict[str, Experiment]:
    """Every unique experiment of every table, keyed by canonical id, resolved at ``scale``
    (a copy: callers may change the configs)."""
    return copy.deepcopy(_all_experiments(Path(root) if root else experiments_dir(), scale))


def get_experiment(exp_id: str, scale: str = "paper", root: str | Path | None = None) -> Experiment:
    """One experiment by canonical id (only its own runs are resolved); an unknown id is a
    ConfigError listing the valid ones."""
    path = Path(root) if root else experiments_dir()
    known = sorted(_uses(path))
    if exp_id not in known:
        close = difflib.get_close_matches(exp_id, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown experiment {exp_id!r}{hint}; valid experiments: {', '.join(known)}"
        )
    return copy.deepcopy(_experiment(path, scale, exp_id))


def resolve(exp_id: str, scale: str = "paper", root: str | Path | None = None) -> Config:
    """The fully resolved config of experiment ``exp_id`` at ``scale``."""
    return get_experiment(exp_id, scale, root).config


def experiments_for_table(
    table_id: str, scale: str = "paper", root: str | Path | None = None
) -> list[Experiment]:
    """The experiments a table needs, in row order (quoted-only rows need none)."""
    table = load_table(table_id, root)
    experiments = all_experiments(scale, root)
    return [experiments[i] for i in table.experiment_ids]
