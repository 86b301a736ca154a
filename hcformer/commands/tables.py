"""LaTeX tables, provenance, macros and a PDF from the aggregated cells.

The layout, the marks and the macro names: :mod:`hcformer.analysis.tables`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hcformer.analysis.aggregate import read_cells
from hcformer.analysis.tables import compile_pdf, provenance, render_macros, render_table
from hcformer.commands._args import add_results, add_scale, command_parser, write_output
from hcformer.errors import HCFormerError
from hcformer.experiments import load_table, load_tables


def main(argv: list[str]) -> int:
    parser = command_parser("tables", __doc__)
    add_results(parser)
    add_scale(parser, default=None, required=True)
    parser.add_argument(
        "--table", action="append", default=[], help="write this table (repeatable)"
    )
    parser.add_argument(
        "--macros", action="store_true", help="write RESULTS/macros.tex (all tables)"
    )
    parser.add_argument(
        "--pdf", action="store_true", help="compile RESULTS/tables.pdf (all tables)"
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not (args.table or args.macros or args.pdf):
        raise HCFormerError("give --table ID, --macros or --pdf")
    for table_id in args.table:
        table = load_table(table_id)
        cells = read_cells(results / "aggregate" / f"{table_id}.csv")
        tex = write_output(
            results / "tables" / f"{table_id}.tex",
            render_table(table_id, table.title, cells, args.scale),
        )
        prov = provenance(table_id, table.title, cells, args.scale)
        write_output(results / "provenance" / f"{table_id}.json", json.dumps(prov, indent=1) + "\n")
        print(f"hcformer tables: {tex}")
    all_ids = [t.id for t in load_tables()]
    if args.macros:
        all_cells = [read_cells(results / "aggregate" / f"{t}.csv") for t in all_ids]
        macros = write_output(results / "macros.tex", render_macros(all_cells, args.scale))
        print(f"hcformer tables: {macros}")
    if args.pdf:
        texs = [results / "tables" / f"{t}.tex" for t in all_ids]
        absent = [str(t) for t in texs if not t.exists()]
        if absent:
            raise HCFormerError(f"no table file {absent[0]} (run hcformer tables --table first)")
        title = f"HCFormer reproduction: every table, scale {args.scale}"
        compile_pdf(texs, results / "tables.pdf", title)
        print(f"hcformer tables: {results / 'tables.pdf'}", file=sys.stderr)
    return 0
