"""List the unique experiments of the paper's tables and the rows they feed.

How table rows become experiments and their ids: :mod:`hcformer.experiments` (imports no
torch).
"""

from __future__ import annotations

from hcformer.commands._args import add_scale, command_parser, print_json
from hcformer.config import to_dict
from hcformer.experiments import all_experiments, experiments_for_table


def main(argv: list[str]) -> int:
    parser = command_parser("experiments", __doc__)
    parser.add_argument("--table", help="only this table (e.g. table5, tableI_a)")
    add_scale(parser, checked=False, listed=True)
    parser.add_argument("--json", action="store_true", help="JSON with the resolved configs")
    args = parser.parse_args(argv)
    if args.table:
        experiments = experiments_for_table(args.table, args.scale)
    else:
        experiments = list(all_experiments(args.scale).values())
    if args.json:
        print_json(
            [
                {
                    "id": e.id,
                    "dataset": e.dataset,
                    "rows": [list(r) for r in e.rows],
                    "requires": e.requires,
                    "config": to_dict(e.config),
                }
                for e in experiments
            ]
        )
        return 0
    width = max((len(e.id) for e in experiments), default=10)
    print(f"{'experiment':<{width}}  {'iterations':>10}  rows")
    for e in experiments:
        rows = "; ".join(f"{t}: {label}" for t, label in e.rows)
        needs = f"  [requires {e.requires}]" if e.requires else ""
        print(f"{e.id:<{width}}  {e.config.solver.iterations:>10}  {rows}{needs}")
    print(f"{len(experiments)} experiments at scale {args.scale}")
    return 0
