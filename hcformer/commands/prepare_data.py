"""turn an unzipped official dataset release into the readers' layout

What is converted and checked per dataset: :mod:`hcformer.data.prepare`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hcformer.commands._args import command_parser
from hcformer.data.prepare import DATASETS, prepare


def main(argv: list[str]) -> int:
    parser = command_parser("prepare-data", __doc__)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, type=Path, help="the dataset folder")
    parser.add_argument("--splits", nargs="+", default=None, help="default: train and val")
    parser.add_argument(
        "--detectron2",
        action="store_true",
        help="also write the files detectron2/Mask2Former read (semantic maps, train-id PNGs)",
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    prepare(
        args.dataset,
        args.root,
        args.splits,
        detectron2=args.detectron2,
        workers=max(1, args.workers),
    )
    return 0
