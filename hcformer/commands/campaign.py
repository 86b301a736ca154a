"""``hcformer campaign``: run the Snakemake campaign so that a restart after a crash costs nothing.

Every argument passes through to ``snakemake``; the repairs a dead campaign needs come first
(:mod:`hcformer.launch.campaign`).
"""

from __future__ import annotations

import sys

from hcformer.launch.campaign import repair, run_snakemake

USAGE = (
    "usage: hcformer campaign SNAKEMAKE-ARGS...\n\n"
    "Runs snakemake with these arguments, after removing Snakemake's lock when the\n"
    "campaign that held it is gone and keeping every run it finished (docs/campaign.md)."
)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    repair(argv, lambda line: print(f"hcformer campaign: {line}", file=sys.stderr))
    return run_snakemake(argv)
