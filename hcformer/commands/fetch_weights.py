"""download every pretrained backbone checkpoint of a scale into one folder

Where the weights are looked up, and the download itself: :mod:`hcformer.pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from hcformer.commands._args import add_scale, command_parser
from hcformer.experiments import pretrained_weights
from hcformer.pretrained import WEIGHTS_ENV, fetch_weights, weights_dir


def main(argv: list[str]) -> int:
    parser = command_parser("fetch-weights", __doc__)
    parser.add_argument(
        "--dir",
        default=None,
        help=f"the weights folder (default ${WEIGHTS_ENV}, else weights/); "
        f"runs find it through ${WEIGHTS_ENV} or as weights/ in their working directory",
    )
    add_scale(parser, checked=False)
    args = parser.parse_args(argv)
    folder = Path(args.dir) if args.dir else weights_dir()
    fetch_weights(folder, pretrained_weights(args.scale), scale=args.scale)
    return 0
