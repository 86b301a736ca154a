"""Parameters, GFLOPs (fvcore's convention) and, optionally, latency of every row of a table
(`hcformer profile`). The smoke scale profiles the `tiny` models it trains."""


rule profile:
    output:
        f"{RESULTS}/profile/{{table}}.json",
    log:
        f"{RESULTS}/logs/profile/{{table}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profile/{{table}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        login=1,
    params:
        latency="--latency" if config.get("profile_latency") else "",
    shell:
        "OMP_NUM_THREADS=1 hcformer profile --table {wildcards.table} --scale "
        + PROFILE_SCALE
        + " --out {output} {params.latency} > {log} 2>&1"
