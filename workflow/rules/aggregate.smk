"""MLflow and aggregation: a serial step fills MLflow from the run folders with whatever the runs
did not log (one writer at a time: `flock`; only under runs/, since the store's artefacts beside
it hold copies of config.yaml), then the medians over seeds per table cell and a CSV of every
run."""


rule sync_mlflow:
    input:
        table_metrics,
        store=f"{RESULTS}/mlflow.ready",
    output:
        touch(f"{RESULTS}/mlflow/{{table}}.synced"),
    log:
        f"{RESULTS}/logs/sync_mlflow/{{table}}.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        uri=mlflow_uri(),
        runs=f"{RESULTS}/{RUNS}",
    shell:
        "flock {input.store} hcformer sync-mlflow --results {params.runs}"
        + " --uri '{params.uri}' > {log} 2>&1"


rule aggregate_table:
    input:
        table_metrics,
        profile=f"{RESULTS}/profile/{{table}}.json",
        synced=f"{RESULTS}/mlflow/{{table}}.synced",
    output:
        f"{RESULTS}/aggregate/{{table}}.csv",
    log:
        f"{RESULTS}/logs/aggregate/{{table}}.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        uri=mlflow_uri(),
        seeds=" ".join(map(str, SEEDS)),
        skip=skip_option(),
    shell:
        "hcformer aggregate --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --seeds {params.seeds} {params.skip}"
        + " --table {wildcards.table} --profile {input.profile}"
        + " --mlflow-uri '{params.uri}' --out {output} > {log} 2>&1"


rule runs_csv:
    input:
        all_metrics(),
        expand(f"{RESULTS}/mlflow/{{table}}.synced", table=TABLES),
    output:
        runs=f"{RESULTS}/runs.csv",
        summary=f"{RESULTS}/summary.csv",
    log:
        f"{RESULTS}/logs/aggregate/runs.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        uri=mlflow_uri(),
        seeds=" ".join(map(str, SEEDS)),
        skip=skip_option(),
    shell:
        "hcformer aggregate --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --seeds {params.seeds} {params.skip}"
        + " --mlflow-uri '{params.uri}' --runs-csv {output.runs} --summary-csv {output.summary}"
        + " > {log} 2>&1"
