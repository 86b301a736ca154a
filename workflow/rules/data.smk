"""Data: synthetic datasets made once and shared (tiny, smoke); at paper scale a check that the
datasets and pretrained weights every experiment needs are where its config says, before any run
is submitted (compute nodes are often offline: `hcformer check-data`). `prepare_data` turns an
unzipped official release into the readers' layout (docs/datasets.md), on request:
`snakemake --cores 1 --config scale=paper -- results/paper/data/coco_panoptic.prepared`.
"""


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


rule prepare_data:
    output:
        touch(f"{RESULTS}/data/{{dataset}}.prepared"),
    log:
        f"{RESULTS}/logs/data/{{dataset}}.prepare.log",
    conda:
        ENV
    threads: 4
    resources:
        login=1,
    params:
        root=dataset_root,
    shell:
        "hcformer prepare-data --dataset {wildcards.dataset} --root {params.root} "
        "--workers {threads} > {log} 2>&1"


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
