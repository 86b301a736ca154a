"""COCO mask AP (pycocotools, the paper's reference) and boundary AP (faster-coco-eval).

What is scored: :mod:`hcformer.evaluation.instance`.
"""

from __future__ import annotations

import json

from hcformer.commands._args import add_json_out, command_parser, write_output
from hcformer.evaluation.instance import evaluate_instance


def main(argv: list[str]) -> int:
    parser = command_parser("evaluate-instance", __doc__)
    parser.add_argument("--gt-json", required=True)
    parser.add_argument("--results-json", required=True)
    parser.add_argument("--boundary", action="store_true", help="also boundary AP (dilation 0.02)")
    add_json_out(parser)
    args = parser.parse_args(argv)
    res = evaluate_instance(args.gt_json, args.results_json, boundary=args.boundary)
    write_output(args.out, json.dumps(res, indent=1))
    line = f"AP {res['ap']:.2f}  AP50 {res['ap50']:.2f}  AP75 {res['ap75']:.2f}"
    if args.boundary:
        line += f"  boundary AP {res['ap_boundary']:.2f}"
    print(line)
    return 0
