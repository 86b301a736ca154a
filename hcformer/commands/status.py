"""Runs done, running, failed and not started, per paper table.

How a run's state is decided and where a failed run's log is: :mod:`hcformer.analysis.status`
(reads files only, imports no torch, mlflow or pandas).
"""

from __future__ import annotations

from pathlib import Path

from hcformer.analysis.status import campaign_status, render, to_json
from hcformer.commands._args import add_scale, add_seeds, command_parser, print_json
from hcformer.errors import HCFormerError
from hcformer.runfolder import RUNS


def main(argv: list[str]) -> int:
    parser = command_parser("status", __doc__)
    parser.add_argument(
        "--results",
        default="results",
        help="the results folder (default results; runs under RESULTS/SCALE/runs), or a scale's "
        "root that holds runs/ itself",
    )
    add_scale(parser, default="smoke")
    parser.add_argument("--table", help="only this table (e.g. table5)")
    add_seeds(parser)
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not (results / RUNS).is_dir():
        results = results / args.scale
    if results.exists() and not results.is_dir():
        raise HCFormerError(f"--results {args.results}: not a folder")
    tables = campaign_status(results, args.scale, list(args.seeds), args.table)
    report = to_json(tables, results, args.scale, list(args.seeds))
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0
