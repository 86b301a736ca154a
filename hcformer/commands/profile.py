"""Parameters, GFLOPs (fvcore convention, post-processing included) and latency of a paper
table's rows, beside the paper's numbers.

The counting and the JSON's fields: :mod:`hcformer.analysis.profile`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hcformer.analysis.profile import format_table, profile_table
from hcformer.commands._args import add_scale, command_parser, write_output
from hcformer.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = command_parser("profile", __doc__)
    parser.add_argument("--table", required=True, help="table id, e.g. table5 or tableII")
    add_scale(parser, checked=False, listed=True)
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="only these row labels")
    parser.add_argument("--latency", action="store_true", help="also time model + post-processing")
    parser.add_argument("--device", default="cpu", help="device for --latency (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for --latency")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ConfigError(f"--repeats: expected an integer >= 1, got {args.repeats}")
    result = profile_table(
        args.table,
        args.scale,
        rows=args.rows,
        latency=args.latency,
        device=args.device,
        repeats=args.repeats,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print(format_table(result))
    if args.out:
        write_output(args.out, json.dumps(result, indent=1) + "\n")
    return 0
