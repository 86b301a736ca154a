"""GPU-hours of the paper's experiments from their schedules, before submitting.

The figures and the formula: :mod:`hcformer.analysis.budget` (imports no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hcformer.analysis.budget import DEFAULT_SEEDS, campaign_budget, render
from hcformer.commands._args import command_parser, write_output


def main(argv: list[str]) -> int:
    parser = command_parser("budget", __doc__)
    parser.add_argument("--table", default="all", help="a paper table id, or all (default)")
    parser.add_argument(
        "--gpu-seconds-per-iter",
        dest="figures",
        action="append",
        default=[],
        metavar="FILE",
        help="figures that replace the estimates per family: a YAML like "
        "experiments/gpu_seconds_per_iter.yaml or hcformer benchmark-train's JSON (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="runs per experiment")
    parser.add_argument(
        "--out", default="results/paper/budget.json", help="the JSON (default %(default)s)"
    )
    parser.add_argument("--experiments", action="store_true", help="one line per experiment")
    args = parser.parse_args(argv)
    tables = None if args.table == "all" else [args.table]
    budget = campaign_budget(tables, [Path(p) for p in args.figures], args.seeds)
    print(render(budget, args.experiments or tables is not None))
    out = write_output(args.out, json.dumps(budget, indent=1) + "\n")
    print(f"hcformer budget: written {out}", file=sys.stderr)
    return 0
