"""One run job per (experiment, seed), or per experiment with its seeds batched in one process
(`batch_seeds`, for the smoke scale where start-up dominates). A rule blocks until its runs end:
`hcformer run` submits through the launcher (slurm, local, inline) and waits, so Snakemake needs
no SLURM plugin; the run folder's metrics.json (written last) is the output."""

RUN_RESOURCES = dict(
    gpus=lambda wc: int(experiment_resources(wc.exp).get("gpus", 0)),
    mem_mb=lambda wc: int(float(experiment_resources(wc.exp).get("mem_gb", 4)) * 1024),
    runtime=lambda wc: int(experiment_resources(wc.exp).get("time_min", 60)),
    runs=1,  # `--resources runs=N`: at most N runs in flight (a cluster's submit limit)
)


if config["batch_seeds"]:

    rule run:
        input:
            dataset_marker,
            f"{RESULTS}/mlflow.ready",
        output:
            [metrics("{exp}", s) for s in SEEDS],
        log:
            run_rule_log("{exp}"),
        benchmark:
            f"{RESULTS}/benchmarks/run/{{exp}}.tsv"
        conda:
            ENV
        threads: config["threads_per_run"]
        resources:
            **RUN_RESOURCES,
        params:
            seeds=" ".join(map(str, SEEDS)),
            options=launcher_options(),
            environment=run_environment(),
            tracking=tracking_overrides(),
        shell:
            "{params.environment} hcformer run --experiment {wildcards.exp} --scale "
            + SCALE
            + " --seeds {params.seeds} --results "
            + RESULTS
            + " --launcher "
            + LAUNCHER
            + " --wait-locked {params.tracking} {params.options} > {log} 2>&1"

else:

    rule run:
        input:
            dataset_marker,
            f"{RESULTS}/mlflow.ready",
        output:
            metrics("{exp}", "{seed}"),
        log:
            run_rule_log("{exp}", "{seed}"),
        benchmark:
            f"{RESULTS}/benchmarks/run/{{exp}}/seed{{seed}}.tsv"
        conda:
            ENV
        threads: config["threads_per_run"] if LAUNCHER != "slurm" else 1
        resources:
            **RUN_RESOURCES,
        params:
            options=launcher_options(),
            environment=run_environment(),
            tracking=tracking_overrides(),
        shell:
            "{params.environment} hcformer run --experiment {wildcards.exp} --scale "
            + SCALE
            + " --seed {wildcards.seed} --results "
            + RESULTS
            + " --launcher "
            + LAUNCHER
            + " --wait-locked {params.tracking} {params.options} > {log} 2>&1"
