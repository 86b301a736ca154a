"""One booktabs .tex per paper table (the paper's value, ours, the difference), its provenance
file, and for all tables the LaTeX macros and, when pdflatex is installed, a PDF."""


rule table:
    input:
        f"{RESULTS}/aggregate/{{table}}.csv",
    output:
        tex=f"{RESULTS}/tables/{{table}}.tex",
        provenance=f"{RESULTS}/provenance/{{table}}.json",
    log:
        f"{RESULTS}/logs/tables/{{table}}.log",
    conda:
        ENV
    resources:
        login=1,
    shell:
        "hcformer tables --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --table {wildcards.table} > {log} 2>&1"


rule tables_all:
    input:
        expand(f"{RESULTS}/tables/{{table}}.tex", table=TABLES),
    output:
        [f"{RESULTS}/macros.tex"] + ([f"{RESULTS}/tables.pdf"] if PDFLATEX else []),
    log:
        f"{RESULTS}/logs/tables/all.log",
    conda:
        ENV
    resources:
        login=1,
    params:
        pdf="--pdf" if PDFLATEX else "",
    shell:
        "hcformer tables --results "
        + RESULTS
        + " --scale "
        + SCALE
        + " --macros {params.pdf} > {log} 2>&1"
