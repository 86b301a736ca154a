"""``hcformer report``: the ``README.md`` of a results tree.

What the README says: :mod:`hcformer.analysis.report`.
"""

from __future__ import annotations

from pathlib import Path

from hcformer.analysis.report import render
from hcformer.commands._args import add_results, command_parser, write_output


def main(argv: list[str]) -> int:
    parser = command_parser("report", __doc__)
    add_results(parser)
    parser.add_argument("--scale", help="the scale (default: the results folder's name)")
    parser.add_argument("--out", help="default RESULTS/README.md")
    args = parser.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "README.md"
    print(f"hcformer report: {write_output(out, render(results, args.scale or results.name))}")
    return 0
