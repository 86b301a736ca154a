"""A snapshot of the campaign: every table, figure and the README from the runs finished so far,
in results/<scale>/snapshot/ (`hcformer aggregate --snapshot`). The rule has no input and no
output file: it needs no run (so it waits for and submits nothing), it runs each time it is
asked for, and it runs beside a campaign's Snakemake, whose lock covers only files. When a
workflow that had runs to do ends with a failed job, the onerror hook makes a snapshot too (with
keep-going, after every job that did not need the failed one)."""

import shlex
import subprocess


rule snapshot:
    log:
        f"{RESULTS}/logs/snapshot.log",
    localrule: True
    conda:
        ENV
    params:
        args=shlex.join(snapshot_arguments()),
    shell:
        "hcformer {params.args} 2>&1 | tee {log}"


onstart:
    # Snakemake 9 ends by deleting .snakemake/locks whole, a running campaign's lock included;
    # a snapshot alone locks no file, so it unlocks none (as --nolock), leaving that in place.
    if planned_rules() == {"snapshot"}:
        workflow.persistence.unlock = lambda: None


onerror:
    planned = planned_rules()
    if planned is None or ("run" in planned and "snapshot" not in planned):
        print(
            "hcformer: a job failed; a snapshot of every table from the runs finished so far "
            f"(failed cells marked): {RESULTS}/snapshot/README.md",
            file=sys.stderr,
        )
        cmd = [sys.executable, "-m", "hcformer.cli", *snapshot_arguments()]
        try:
            subprocess.run(cmd, check=False, timeout=900)
        except subprocess.TimeoutExpired:
            print(
                "hcformer: the snapshot took over 15 minutes: stopped",
                file=sys.stderr,
            )
