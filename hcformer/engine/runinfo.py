"""The engine's side of a run folder: the resolved config and who the run is.

``config.yaml`` (the fully resolved config, written once; a rerun with another config fails) and
``run.json`` (``exp_id``, ``seed``, ``scale``, ``dataset``, ``git_commit``, ``tables``: the
``{table_id: row label}`` of the paper rows it feeds; MLflow's tags). The names of every file of
a run folder and how they are written: :mod:`hcformer.runfolder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hcformer.config import Config, build_config, flatten, to_dict
from hcformer.errors import ConfigError, HCFormerError
from hcformer.runfolder import CONFIG, RUN_INFO, read_json, write_json_atomic, write_text_atomic


def write_run_files(run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``run.json`` on first use; on a rerun check the config is the same."""
    path = run_dir / CONFIG
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        a, b = flatten(old), flatten(new)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
            raise ConfigError(
                f"{path}: this run folder was started with another config ({shown}"
                f"{', ...' if len(diff) > 5 else ''}); use a new --run-dir or remove the folder"
            )
    else:
        write_text_atomic(path, yaml.safe_dump(new, sort_keys=False))
    if not (run_dir / RUN_INFO).is_file():
        write_json_atomic(run_dir / RUN_INFO, info)


def read_run(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The config and run info of a run folder (clear errors when they are missing)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise HCFormerError(
            f"{path}: no such file; is {run_dir} a run folder written by hcformer train?"
        )
    try:
        cfg = build_config(yaml.safe_load(path.read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    info = read_json(run_dir / RUN_INFO, strict=True) or {}
    info.setdefault("dataset", cfg.data.dataset)
    return cfg, info


def check_num_classes(cfg: Config, dataset) -> None:
    """The model's classes must be the dataset's (e.g. a tiny synthetic set has fewer)."""
    if cfg.model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes}, but the {cfg.data.dataset} data at "
            f"data.root {cfg.data.root} has {dataset.num_classes} classes; "
            f"set model.num_classes={dataset.num_classes}"
        )
