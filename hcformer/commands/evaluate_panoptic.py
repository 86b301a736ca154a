"""Panoptic quality (Kirillov et al. 2019) exactly as panopticapi's ``pq_compute``.

The matching rules: :mod:`hcformer.evaluation.panoptic`.
"""

from __future__ import annotations

import json

from hcformer.commands._args import add_json_out, command_parser, write_output
from hcformer.evaluation.panoptic import evaluate_panoptic


def main(argv: list[str]) -> int:
    parser = command_parser("evaluate-panoptic", __doc__)
    for name in ("--gt-json", "--gt-dir", "--pred-json", "--pred-dir"):
        parser.add_argument(name, required=True)
    add_json_out(parser)
    args = parser.parse_args(argv)
    res = evaluate_panoptic(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    write_output(args.out, json.dumps(res, indent=1))
    print(
        f"PQ {res['pq']:.2f}  SQ {res['sq']:.2f}  RQ {res['rq']:.2f}  PQ_th {res['pq_th']:.2f}  "
        f"PQ_st {res['pq_st']:.2f}  ({res['images']} images)"
    )
    return 0
