"""``hcformer benchmark-train``: seconds per training iteration of an experiment on this device.

What is timed and the JSON's fields: :mod:`hcformer.engine.benchmark`.
"""

from __future__ import annotations

import json
import sys

from hcformer.commands._args import (
    add_device,
    add_experiment_or_config,
    add_overrides,
    add_scale,
    command_parser,
    write_output,
)
from hcformer.engine.benchmark import benchmark, readable
from hcformer.errors import HCFormerError
from hcformer.launch.create import resolve_run


def main(argv: list[str]) -> int:
    parser = command_parser("benchmark-train", __doc__)
    add_experiment_or_config(parser, config_help="a config YAML of one's own")
    add_scale(parser)
    parser.add_argument(
        "--batch", type=int, default=0, help="images per iteration (default: the config's)"
    )
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    add_device(parser)
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        raise HCFormerError("--iterations must be >= 1 and --warmup >= 0")
    cfg, info = resolve_run(
        experiment=args.experiment,
        config_file=args.config,
        scale=args.scale,
        seed=0,
        overrides=args.overrides,
    )
    result = benchmark(
        cfg,
        info["exp_id"],
        batch=args.batch or cfg.solver.batch_size,
        iterations=args.iterations,
        warmup=args.warmup,
        device=args.device,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    result.update({"exp_id": info["exp_id"], "scale": args.scale, "git_commit": info["git_commit"]})
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        write_output(args.out, text + "\n")
    print(text)
    print(readable(result), file=sys.stderr)
    return 0
