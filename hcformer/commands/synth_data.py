"""Write a synthetic dataset in a real format.

The scenes and the formats: :mod:`hcformer.data.synthetic`.
"""

from __future__ import annotations

import time

from hcformer.commands._args import command_parser
from hcformer.data.synthetic import FORMATS, write_synthetic
from hcformer.errors import DataError


def parse_size(text: str) -> tuple[int, int]:
    """``--size HxW`` as ``(H, W)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"--size {text!r}: expected HxW, e.g. 128x128") from None
    return h, w


def main(argv: list[str]) -> int:
    parser = command_parser("synth-data", __doc__)
    parser.add_argument("--dataset", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="the dataset root to create")
    parser.add_argument("--images", type=int, default=200, help="training images")
    parser.add_argument("--val-images", type=int, default=None, help="default: max(8, images // 8)")
    parser.add_argument("--size", default="128x128", help="HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = write_synthetic(
        args.dataset, args.out, args.images, parse_size(args.size), args.seed, args.val_images
    )
    print(f"{out}: {args.dataset} written in {time.perf_counter() - start:.1f} s")
    return 0
