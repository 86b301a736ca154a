"""Shared values and input functions: the experiments of the paper's tables, from the registry.

The experiment list comes from `hcformer.experiments` (it imports no torch); every other step is
a thin call of the `hcformer` command.
"""

import os
import shutil
import sys
from pathlib import Path

from hcformer.experiments import all_experiments, load_tables, scales
from hcformer.errors import ConfigError
from hcformer.runfolder import METRICS, RUNS, run_dir, run_log
from hcformer.tracking.store import check_live_store
from snakemake.exceptions import WorkflowError

SCALE = config["scale"]
if SCALE not in scales():
    raise WorkflowError(
        f"config scale: {SCALE!r} is not one of {', '.join(scales())} (experiments/scales/)"
    )
SEEDS = [int(s) for s in config["seeds"]]
RESULTS = f"{config['results']}/{SCALE}"
LAUNCHER = config["launcher"]
# Every rule's conda environment: Python, then the project itself (hcformer.post-deploy.sh).
ENV = "../envs/hcformer.yaml"
# The tiny and smoke models are the same: profile them once, at `tiny` (the paper's sizes take
# minutes a table to count, and their numbers are the paper's, not the smoke runs').
PROFILE_SCALE = "paper" if SCALE == "paper" else "tiny"
PDFLATEX = shutil.which("pdflatex") is not None

TABLES = {t.id: t for t in load_tables()}
EXPERIMENTS = all_experiments(SCALE)
SKIPPED = {
    e.id
    for e in EXPERIMENTS.values()
    if e.requires and e.requires in config["skip_requires"]
}
# Tables with a figure of their ablation (`figure: true`): each seed a point, the median a line.
ABLATIONS = [t for t in TABLES if TABLES[t].figure]
VISUALIZE = [
    e for e in config.get("visualize", []) if e in EXPERIMENTS and e not in SKIPPED
]


def mlflow_uri():
    """The tracking URI every step uses: the config, $MLFLOW_TRACKING_URI, or the scale's store."""
    uri = config.get("mlflow_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path(RESULTS).resolve()}/mlflow.db"


def skip_option():
    """`--skip-requires ...` for the parts left out (their cells read `not built`)."""
    skip = config.get("skip_requires", [])
    return f"--skip-requires {' '.join(skip)}" if skip else ""


def table_experiments(table):
    """The experiment ids a table needs (rows it quotes need none; skipped parts left out)."""
    return [i for i in TABLES[table].experiment_ids if i not in SKIPPED]


def metrics(exp, seed):
    """A run's metrics.json (its last file: the run rule's output); `seed` may be "{seed}"."""
    return str(run_dir(RESULTS, exp, seed) / METRICS)


def run_rule_log(exp, seed=None):
    """The run rule's log (one per run, or per experiment when its seeds run in one job)."""
    return str(run_log(RESULTS, exp, seed))


def table_metrics(wildcards):
    return [metrics(e, s) for e in table_experiments(wildcards.table) for s in SEEDS]


def all_metrics():
    return [metrics(e, s) for e in EXPERIMENTS if e not in SKIPPED for s in SEEDS]


def experiment_resources(exp):
    """The launcher hints of an experiment (experiments/ ... resources: gpus, cpus, mem_gb, time_min)."""
    return dict(EXPERIMENTS[exp].config.resources)


def dataset_marker(wildcards):
    return f"{RESULTS}/data/{EXPERIMENTS[wildcards.exp].dataset}.ok"


def table_outputs(table):
    out = [f"{RESULTS}/tables/{table}.tex", f"{RESULTS}/provenance/{table}.json"]
    if table in ABLATIONS:
        out.append(f"{RESULTS}/figures/{table}.pdf")
    return out


def visual_outputs():
    return [f"{RESULTS}/figures/hierarchy/{e}.png" for e in VISUALIZE]


def data_command(wildcards):
    if SCALE == "paper":
        if not config.get("check_inputs", True):
            return "echo 'check_inputs: false: not checked'"
        return f"hcformer check-data --scale {SCALE} --dataset {wildcards.dataset}"
    cfg = next(e.config for e in EXPERIMENTS.values() if e.dataset == wildcards.dataset)
    synth = cfg.data.synthetic
    height, width = synth.size
    return (
        f"hcformer synth-data --dataset {wildcards.dataset} --out {cfg.data.root} "
        f"--images {synth.train_images} --val-images {synth.val_images} "
        f"--size {height}x{width} --seed {synth.seed}"
    )


def dataset_root(wildcards):
    """data.root of a dataset's experiments (the configs agree on it)."""
    return next(
        e.config.data.root
        for e in EXPERIMENTS.values()
        if e.dataset == wildcards.dataset
    )


def launcher_options():
    """The `hcformer run` options of the slurm launcher from the workflow config."""
    if LAUNCHER != "slurm":
        return ""
    slurm = config.get("slurm", {})
    opts = [
        f"--{key} {slurm[key]}"
        for key in ("partition", "account", "qos", "constraint")
        if slurm.get(key)
    ]
    opts += [f"--setup '{line}'" for line in slurm.get("setup", [])]
    opts += [f"--sbatch {key}={value}" for key, value in slurm.get("extra", {}).items()]
    return " ".join(opts)


def run_environment():
    return f"OMP_NUM_THREADS={config['threads_per_run']} MLFLOW_TRACKING_URI='{mlflow_uri()}'"


def tracking_overrides():
    """`--set tracking.enabled=false` unless runs log live (`mlflow_live`), which is refused
    here, before any job, for a SQLite or file store on a network file system."""
    if not config.get("mlflow_live", False):
        return "--set tracking.enabled=false"
    try:
        check_live_store(mlflow_uri())
    except ConfigError as exc:
        raise WorkflowError(f"mlflow_live: {exc}") from None
    return ""


def snapshot_arguments():
    """The arguments of `hcformer` that make the snapshot of this scale."""
    args = ["aggregate", "--results", RESULTS, "--scale", SCALE, "--seeds"]
    args += [str(s) for s in SEEDS]
    if config.get("skip_requires"):
        args += ["--skip-requires", *config["skip_requires"]]
    return args + ["--mlflow-uri", mlflow_uri(), "--snapshot", f"{RESULTS}/snapshot"]


def planned_rules():
    """The rules of the jobs this Snakemake planned to run (None if its DAG cannot be read)."""
    try:
        return {j.rule.name for j in workflow.dag.needrun_jobs(exclude_finished=False)}
    except Exception:  # another Snakemake's DAG interface
        return None


wildcard_constraints:
    exp=r"[a-z0-9_]+/[A-Za-z0-9_.+-]+",
    seed=r"\d+",
    table=r"table[0-9A-Za-z_]+",
    dataset=r"[a-z0-9_]+",


print(
    f"hcformer workflow: scale={SCALE} launcher={LAUNCHER} seeds={','.join(map(str, SEEDS))} "
    f"experiments={len(EXPERIMENTS) - len(SKIPPED)} results={RESULTS} "
    f"cores={workflow.resource_settings.cores}",
    file=sys.stderr,
)
