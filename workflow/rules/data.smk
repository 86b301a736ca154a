"""Data: synthetic datasets made once and shared (tiny, smoke); at paper scale a check that the
datasets and pretrained weights every experiment needs are where its config says, before any run
is submitted (compute nodes are often offline)."""


rule data:
    output:
        touch(f"{RESULTS}/data/{{dataset}}.ok"),
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        command=data_command,
    shell:
        "{params.command} > {log} 2>&1"


rule mlflow_store:
    output:
        touch(f"{RESULTS}/mlflow.ready"),
    log:
        f"{RESULTS}/logs/mlflow_store.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        uri=mlflow_uri(),
    shell:
        "python workflow/scripts/mlflow_store.py --uri '{params.uri}' > {log} 2>&1"
