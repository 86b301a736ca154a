"""Fig. 5-style view: cluster boundaries per level, leakage in red, prediction vs GT.

What is drawn: :mod:`hcformer.analysis.visualize`.
"""

from __future__ import annotations

from hcformer.analysis.visualize import draw_run
from hcformer.commands._args import command_parser


def main(argv: list[str]) -> int:
    parser = command_parser("visualize", __doc__)
    parser.add_argument("--run-dir", required=True, help="a run folder with visual/*.npz")
    parser.add_argument("--out", required=True, help="the image to write (.png or .pdf)")
    parser.add_argument("--max-images", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"hcformer visualize: {draw_run(args.run_dir, args.out, args.max_images)}")
    return 0
