"""Medians over seeds of the run folders: a table's cells, or runs.csv.

What a cell holds and how a run's state is read: :mod:`hcformer.analysis.aggregate`; the
``--snapshot`` of a campaign in progress: :mod:`hcformer.analysis.snapshot`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hcformer.analysis import aggregate
from hcformer.analysis.snapshot import build
from hcformer.commands._args import add_results, add_scale, add_seeds, command_parser
from hcformer.errors import HCFormerError
from hcformer.experiments import all_experiments, load_table


def main(argv: list[str]) -> int:
    parser = command_parser("aggregate", __doc__)
    add_results(parser)
    add_scale(parser, default=None, required=True)
    add_seeds(parser)
    parser.add_argument("--table", help="a paper table id (hcformer experiments lists them)")
    parser.add_argument("--profile", help="the table's `hcformer profile` JSON")
    parser.add_argument("--out", help="the table's cells CSV (default RESULTS/aggregate/TABLE.csv)")
    parser.add_argument("--runs-csv", help="write every run of every table here")
    parser.add_argument("--summary-csv", help="write medians per experiment and metric here")
    parser.add_argument("--skip-requires", nargs="*", default=[], help="parts left out (not_built)")
    parser.add_argument("--mlflow-uri", default="", help="read MLflow run ids from this store")
    parser.add_argument(
        "--snapshot",
        nargs="?",
        const="",
        metavar="DIR",
        help="every table, figure and the README from the runs finished so far, waiting for "
        "none (default DIR: RESULTS/snapshot)",
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    experiments = all_experiments(args.scale)
    skipped = {
        e.id for e in experiments.values() if e.requires and e.requires in args.skip_requires
    }
    if args.snapshot is not None:
        snap = build(
            results,
            args.scale,
            args.seeds,
            Path(args.snapshot) if args.snapshot else None,
            args.skip_requires,
            args.mlflow_uri,
        )
        print(snap.summary())
        for error in snap.errors:
            print(f"hcformer aggregate: error: snapshot: {error}", file=sys.stderr)
        return 1 if snap.errors else 0
    if not args.table and not (args.runs_csv or args.summary_csv):
        raise HCFormerError(
            "give --table (a table's cells), --runs-csv/--summary-csv or --snapshot"
        )
    datasets = {e.dataset for e in experiments.values()}
    ids = aggregate.mlflow_run_ids(args.mlflow_uri, args.scale, datasets)
    if args.table:
        table = load_table(args.table)
        needed = table.experiment_ids
        runs = aggregate.collect_runs(results, needed, args.seeds, ids)
        profile_path = Path(args.profile) if args.profile else None
        cells = aggregate.table_cells(
            table,
            runs,
            args.seeds,
            aggregate.load_profile(profile_path),
            skipped,
            str(profile_path or ""),
        )
        out = Path(args.out) if args.out else results / "aggregate" / f"{args.table}.csv"
        aggregate.write_cells(cells, out)
        counts: dict[str, int] = {}
        for cell in cells:
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(f"hcformer aggregate: {args.table}: {len(cells)} cells ({summary}) -> {out}")
    if args.runs_csv or args.summary_csv:
        runs = aggregate.collect_runs(results, sorted(experiments), args.seeds, ids)
        aggregate.write_runs(runs, experiments, skipped, args.runs_csv, args.summary_csv)
        if args.runs_csv:
            done = sum(r.status == "done" for r in runs.values())
            print(f"hcformer aggregate: {done} of {len(runs)} runs done -> {args.runs_csv}")
    return 0
