"""``hcformer sync-mlflow --results DIR [--uri U]``: fill MLflow in from the run folders.

Which folders become which MLflow runs, with which times: :mod:`hcformer.tracking.sync`
(idempotent: a second sync changes nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hcformer.commands._args import command_parser
from hcformer.errors import HCFormerError
from hcformer.tracking.sync import sync


def main(argv: list[str]) -> int:
    parser = command_parser("sync-mlflow", __doc__)
    parser.add_argument("--results", required=True, help="a results tree (or one run folder)")
    parser.add_argument("--uri", default="", help="tracking URI (default: each scale's mlflow.db)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise HCFormerError(f"--results {results}: no such folder")
    counts = sync(results, args.uri)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no run folders"
    print(f"hcformer sync-mlflow: {summary}", file=sys.stderr)
    return 0
