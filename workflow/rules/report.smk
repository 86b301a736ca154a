"""The README.md of a results tree: which scale the numbers are, what they mean, where each
table, figure and run is."""


rule report:
    input:
        expand(f"{RESULTS}/tables/{{table}}.tex", table=TABLES),
        f"{RESULTS}/macros.tex",
        f"{RESULTS}/runs.csv",
        [f"{RESULTS}/figures/{t}.pdf" for t in ABLATIONS],
        visual_outputs(),
    output:
        f"{RESULTS}/README.md",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        ENV
    resources:
        login=1,
    shell:
        "hcformer report --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --out {output} > {log} 2>&1"
