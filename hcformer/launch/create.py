"""Creating a run: the one place where a config is resolved (docs/interfaces.md, "The run folder").

A run is an experiment of the paper's tables (``experiments/``, at a scale) or a config file of
one's own, plus a seed and ``--set`` overrides. :func:`create_run` resolves it once and writes
the result into the run folder: ``config.yaml`` (the whole resolved config) and ``run.json``
(``exp_id``, ``seed``, ``scale``, ``dataset``, ``git_commit``, ``tables``: the
``{table_id: row label}`` of the paper rows it feeds, ``overrides``; MLflow's tags). From then
on the folder holds everything: the engine's ``train(run_dir)`` and ``evaluate(run_dir)`` read
it (:func:`hcformer.engine.runinfo.read_run`) and never look at the tables.

``hcformer run`` creates each seed's folder before it submits a job; ``hcformer train
--experiment/--config ... --run-dir`` creates the folder, then trains it. Creating an existing
folder again with the same resolved config changes nothing (the run resumes); with another one
it is an error naming the folder's config and the keys that differ.

No torch here: the process that submits and waits calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hcformer.config import (
    Config,
    build_config,
    flatten,
    load_config,
    merge,
    parse_overrides,
    to_dict,
)
from hcformer.errors import ConfigError
from hcformer.experiments import get_experiment
from hcformer.runfolder import CONFIG, RUN_INFO, git_commit, write_json_atomic, write_text_atomic
from hcformer.tracking import check_live

SHOWN_DIFFERENCES = 5  # keys named in the error for a folder created with another config


def resolve_run(
    *,
    experiment: str | None,
    config_file: str | None,
    scale: str,
    seed: int,
    overrides: list[str],
) -> tuple[Config, dict[str, Any]]:
    """The resolved config and the run info (``run.json``) of an experiment or a config file,
    written nowhere (``hcformer benchmark-train`` times a config without a run folder)."""
    if not experiment and not config_file:
        raise ConfigError("give --experiment ID or --config FILE")
    tables: dict[str, str] = {}
    if config_file:
        cfg = load_config(config_file, overrides)
        exp_id = experiment or Path(config_file).stem
    else:
        exp = get_experiment(experiment, scale)
        cfg = exp.config
        if overrides:
            cfg = build_config(merge(to_dict(cfg), parse_overrides(overrides)))
        exp_id = exp.id
        for table_id, label in exp.rows:
            tables[table_id] = f"{tables[table_id]}; {label}" if table_id in tables else label
    info = {
        "exp_id": exp_id,
        "seed": seed,
        "scale": scale,
        "dataset": cfg.data.dataset,
        "git_commit": git_commit(),
        "tables": tables,
        "overrides": list(overrides),
    }
    return cfg, info


def create_run(
    run_dir: str | Path,
    *,
    experiment: str | None = None,
    config_file: str | None = None,
    scale: str,
    seed: int,
    overrides: list[str] | None = None,
) -> Path:
    """Resolve the run (:func:`resolve_run`) and write ``config.yaml`` and ``run.json`` into
    ``run_dir`` (made if absent); returns ``run_dir``.

    Live MLflow logging to a store that cannot take it is refused first, before anything is
    written (:func:`hcformer.tracking.check_live`). A folder that has a
    ``config.yaml`` keeps it when the new resolution is the same (a rerun resumes) and raises
    :class:`ConfigError` otherwise; ``run.json`` is written once (the first creation stays).
    """
    run_dir = Path(run_dir)
    cfg, info = resolve_run(
        experiment=experiment,
        config_file=config_file,
        scale=scale,
        seed=seed,
        overrides=list(overrides or []),
    )
    new = to_dict(cfg)
    check_live(run_dir, new, info)
    path = run_dir / CONFIG
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        a, b = flatten(old), flatten(new)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = ", ".join(
                f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:SHOWN_DIFFERENCES]
            )
            more = ", ..." if len(diff) > SHOWN_DIFFERENCES else ""
            raise ConfigError(
                f"{path}: this run folder was started with another config ({shown}{more}); "
                "use a new --run-dir or remove the folder"
            )
    else:
        write_text_atomic(path, yaml.safe_dump(new, sort_keys=False))
    if not (run_dir / RUN_INFO).is_file():
        write_json_atomic(run_dir / RUN_INFO, info)
    return run_dir
