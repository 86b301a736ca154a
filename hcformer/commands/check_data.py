"""check every dataset file and pretrained weight a scale's experiments need

What is checked, and the command each missing file names: :mod:`hcformer.data.check`.
"""

from __future__ import annotations

from hcformer.commands._args import add_scale, command_parser
from hcformer.data.check import check_scale
from hcformer.data.prepare import DATASETS


def main(argv: list[str]) -> int:
    parser = command_parser("check-data", __doc__)
    add_scale(parser, checked=False)
    parser.add_argument("--dataset", default=None, choices=DATASETS)
    args = parser.parse_args(argv)
    check_scale(args.scale, args.dataset)
    print(f"check-data: {args.dataset or 'every dataset'} at scale {args.scale}: all present")
    return 0
