"""The reproduction DAG of HCFormer (arXiv:2205.09949v3): every table and figure of the paper.

    snakemake --cores all all_tables          # smoke scale, on this machine (workflow/config.yaml)
    snakemake --cores all --config scale=tiny table_tableV
    snakemake --profile slurm all_tables      # paper scale on SLURM (./slurm)

run(experiment, seed) -> aggregate(table) -> table / figure -> report; profile(table) for
params, GFLOPs and latency. Targets: all_tables, table_<id> for each paper table, figures,
report, and snapshot (every table from the runs finished so far, waiting for none; also made
when a job fails). Each scale writes under results/<scale>/. See docs/pipeline.md.
"""

import yaml
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "workflow/config.yaml"


# `--config profile_latency=true` arrives as the string "true" (Snakemake reads only True/False
# as booleans): the boolean keys of the schema take true/false as YAML writes them.
with open("workflow/schemas/config.schema.yaml") as _fh:
    for _key, _spec in yaml.safe_load(_fh)["properties"].items():
        _value = config.get(_key)
        if _spec.get("type") == "boolean" and isinstance(_value, str):
            if _value.lower() in ("true", "false"):
                config[_key] = _value.lower() == "true"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/run.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/snapshot.smk"


localrules:
    all_tables,
    figures,


rule all_tables:
    input:
        [out for table in TABLES for out in table_outputs(table)],
        rules.tables_all.output,
        rules.report.output,
        rules.runs_csv.output,


rule figures:
    input:
        [f"{RESULTS}/figures/{t}.pdf" for t in ABLATIONS],
        visual_outputs(),


for _table in TABLES:

    rule:
        name:
            f"table_{_table}"
        input:
            table_outputs(_table),
        localrule: True
