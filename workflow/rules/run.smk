"""One run job per (experiment, seed), or per experiment with its seeds batched in one process
(`batch_seeds`, for the smoke scale where start-up dominates). A rule blocks until its runs end:
`hcformer run` creates each run folder (the config resolved once), submits through the launcher
(slurm, local, inline) and waits, so Snakemake needs no SLURM plugin; the run folder's
metrics.json (written last) is the output."""

BATCHED = config["batch_seeds"]
RUN_RESOURCES = dict(
    gpus=lambda wc: int(experiment_resources(wc.exp).get("gpus", 0)),
    mem_mb=lambda wc: int(float(experiment_resources(wc.exp).get("mem_gb", 4)) * 1024),
    runtime=lambda wc: int(experiment_resources(wc.exp).get("time_min", 60)),
    runs=1,  # `--resources runs=N`: at most N runs in flight (a cluster's submit limit)
)
# One job: every seed of {exp} (batched), or the seed {seed}.
RUN_JOB = "{exp}" if BATCHED else "{exp}/seed{seed}"


rule run:
    input:
        dataset_marker,
        f"{RESULTS}/mlflow.ready",
    output:
        [metrics("{exp}", s) for s in SEEDS] if BATCHED else metrics("{exp}", "{seed}"),
    log:
        run_rule_log("{exp}") if BATCHED else run_rule_log("{exp}", "{seed}"),
    benchmark:
        f"{RESULTS}/benchmarks/run/{RUN_JOB}.tsv"
    conda:
        ENV
    threads: config["threads_per_run"] if BATCHED or LAUNCHER != "slurm" else 1
    resources:
        **RUN_RESOURCES,
    params:
        seeds=lambda wc: (
            f"--seeds {' '.join(map(str, SEEDS))}" if BATCHED else f"--seed {wc.seed}"
        ),
        options=launcher_options(),
        environment=run_environment(),
        tracking=tracking_overrides(),
    shell:
        "{params.environment} hcformer run --experiment {wildcards.exp} --scale "
        + SCALE
        + " {params.seeds} --results "
        + RESULTS
        + " --launcher "
        + LAUNCHER
        + " --wait-locked {params.tracking} {params.options} > {log} 2>&1"
