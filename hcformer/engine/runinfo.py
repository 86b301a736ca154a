"""The engine's side of a run folder: reading the resolved config and who the run is.

``config.yaml`` (the fully resolved config) and ``run.json`` (``exp_id``, ``seed``, ``scale``,
``dataset``, ``git_commit``, ``tables``: the ``{table_id: row label}`` of the paper rows it
feeds; MLflow's tags) are written once, when the run is created
(:func:`hcformer.launch.create.create_run`). The names of every file of a run folder and how
they are written: :mod:`hcformer.runfolder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hcformer.config import Config, build_config
from hcformer.errors import ConfigError, HCFormerError
from hcformer.runfolder import CONFIG, RUN_INFO, read_json


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
