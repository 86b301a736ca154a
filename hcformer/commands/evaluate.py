"""``hcformer evaluate --run-dir DIR``: score a trained run folder and write ``metrics.json``.

What is scored and written: :mod:`hcformer.engine.evaluate`; the fast-path flags:
:class:`hcformer.models.fuse.InferenceOptions`.
"""

from __future__ import annotations

from hcformer.commands._args import (
    add_device,
    add_inference_arguments,
    command_parser,
    inference_options,
)
from hcformer.engine.evaluate import evaluate


def main(argv: list[str]) -> int:
    parser = command_parser("evaluate", __doc__)
    parser.add_argument("--run-dir", required=True, help="a run folder written by hcformer train")
    add_device(parser)
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    evaluate(args.run_dir, device=args.device, inference=inference_options(args))
    return 0
