"""mIoU and pixel accuracy of semantic predictions (percent).

The two definitions of the mean and the file layout: :mod:`hcformer.evaluation.semantic`.
"""

from __future__ import annotations

import json

from hcformer.commands._args import add_json_out, command_parser, write_output
from hcformer.evaluation.semantic import MEANS, evaluate_semantic


def main(argv: list[str]) -> int:
    parser = command_parser("evaluate-semantic", __doc__)
    parser.add_argument("--dataset", required=True, choices=sorted(MEANS))
    parser.add_argument("--gt-dir", required=True)
    parser.add_argument("--pred-dir", required=True)
    parser.add_argument("--gt-json", default=None, help="coco_panoptic only: the panoptic JSON")
    add_json_out(parser)
    args = parser.parse_args(argv)
    res = evaluate_semantic(args.dataset, args.gt_dir, args.pred_dir, gt_json=args.gt_json)
    write_output(args.out, json.dumps(res, indent=1))
    print(f"mIoU {res['miou']:.2f}  pixel acc {res['pixel_acc']:.2f}  ({res['images']} images)")
    return 0
