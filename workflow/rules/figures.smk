"""Seaborn figures of every ablation (each seed a point, the median a line, the paper's values
beside) and the Fig. 5-style hierarchy view of a trained run."""


rule figure:
    input:
        f"{RESULTS}/aggregate/{{table}}.csv",
    output:
        f"{RESULTS}/figures/{{table}}.pdf",
        f"{RESULTS}/figures/{{table}}.png",
    log:
        f"{RESULTS}/logs/figures/{{table}}.log",
    conda:
        ENV
    resources:
        login=1,
    shell:
        "hcformer figures --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --table {wildcards.table} > {log} 2>&1"


rule visualize:
    input:
        lambda wc: metrics(wc.exp, SEEDS[0]),
    output:
        f"{RESULTS}/figures/hierarchy/{{exp}}.png",
    log:
        f"{RESULTS}/logs/figures/hierarchy/{{exp}}.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        run_dir=lambda wc: str(run_dir(RESULTS, wc.exp, SEEDS[0])),
    shell:
        "hcformer visualize --run-dir {params.run_dir} --out {output} > {log} 2>&1"
