"""Ablation figures (each seed a point, the median a line, the paper beside).

What is drawn, from which cells: :mod:`hcformer.analysis.figures`.
"""

from __future__ import annotations

from pathlib import Path

from hcformer.analysis.aggregate import read_cells
from hcformer.analysis.figures import draw
from hcformer.commands._args import add_results, command_parser
from hcformer.experiments import load_table


def main(argv: list[str]) -> int:
    parser = command_parser("figures", __doc__)
    add_results(parser)
    parser.add_argument("--table", action="append", required=True, help="an ablation table id")
    parser.add_argument("--scale", help="the scale (default: the results folder's name)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    scale = args.scale or results.name
    for table_id in args.table:
        table = load_table(table_id)
        cells = read_cells(results / "aggregate" / f"{table_id}.csv")
        for path in draw(cells, table.title, scale, results / "figures" / table_id):
            print(f"hcformer figures: {path}")
    return 0
