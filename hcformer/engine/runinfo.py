"""The engine's files in a run folder (docs/interfaces.md, "The run folder").

- ``config.yaml``: the fully resolved config (written once; a rerun with another config fails);
- ``run.json``: who the run is: ``exp_id``, ``seed``, ``scale``, ``dataset``, ``git_commit``,
  ``tables`` (``{table_id: row label}`` of the paper rows it feeds) — MLflow's tags;
- ``checkpoints/last.pt`` and ``prev.pt``; ``model_final.pt`` (the weights after the last
  iteration; its presence means training is complete); ``train_log.jsonl``;
- ``predictions/``, ``visual/``, ``metrics.json`` (written by ``hcformer evaluate``, last).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from hcformer.config import Config, build_config, flatten, to_dict
from hcformer.errors import ConfigError, HCFormerError

CONFIG = "config.yaml"
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
FINAL_WEIGHTS = "model_final.pt"
TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


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
    info_path = run_dir / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
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
