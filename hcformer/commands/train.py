"""``hcformer train``: train one experiment into a run folder (App. D; docs/interfaces.md).

    hcformer train --experiment ID --scale paper|tiny|smoke --seed S --run-dir DIR [--set k=v ...]
    hcformer train --config FILE --seed S --run-dir DIR [--set k=v ...]

Creates the run folder (:func:`hcformer.launch.create.create_run`: the config resolved once,
written to ``config.yaml`` and ``run.json``; a folder created with another config is refused),
then trains it (:func:`hcformer.engine.train.train`: resumes from ``checkpoints/last.pt``; a
finished run does nothing). Exits 0 when finished, 128 + signal (or 3) when stopped.
"""

from __future__ import annotations

from hcformer.commands._args import add_experiment_or_config, add_scale, command_parser
from hcformer.engine.train import train
from hcformer.launch.create import create_run


def main(argv: list[str]) -> int:
    parser = command_parser("train", __doc__)
    add_experiment_or_config(parser)
    add_scale(parser, help="scale overlay (default paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--run-dir", required=True, help="the run folder (created; resumed if present)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    run_dir = create_run(
        args.run_dir,
        experiment=args.experiment,
        config_file=args.config,
        scale=args.scale,
        seed=args.seed,
        overrides=args.set,
    )
    return train(run_dir, progress=not args.no_progress).exit_code
