"""Train then evaluate runs of an experiment through a launcher, and wait.

Each seed's run folder is created (the config resolved once, :mod:`hcformer.launch.create`),
then one job per run trains and evaluates it: :mod:`hcformer.launch.run`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from hcformer.commands._args import (
    add_experiment_or_config,
    add_overrides,
    add_scale,
    command_parser,
)
from hcformer.errors import ConfigError
from hcformer.launch.executors import SlurmOptions
from hcformer.launch.run import LAUNCHERS, Launch, plan, run


def _parser() -> argparse.ArgumentParser:
    p = command_parser("run", __doc__)
    add_experiment_or_config(
        p,
        experiment_help="canonical experiment id (hcformer experiments)",
        config_help="a config file of one's own instead of --experiment",
    )
    add_scale(p, default=None, required=True)
    seeds = p.add_mutually_exclusive_group(required=True)
    seeds.add_argument("--seed", type=int, help="one seed")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds, one run folder each")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--results", help="the scale's results root; runs go to RESULTS/runs/...")
    where.add_argument("--run-dir", help="the run folder (one seed only)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="inline")
    add_overrides(p)
    p.add_argument(
        "--poll-s",
        type=float,
        default=None,
        help="seconds between job checks; every run under one results root shares one squeue "
        "call per interval (default: 30 at paper scale, else 5)",
    )
    p.add_argument(
        "--submit-attempts",
        type=int,
        default=8,
        help="submissions tried when sbatch refuses for a transient reason (a submit limit, a "
        "busy controller), with a pause doubling from --retry-backoff-s",
    )
    p.add_argument("--retry-backoff-s", type=float, default=60.0)
    p.add_argument(
        "--wait-locked",
        action="store_true",
        help="when a live process holds a run folder's lock, wait for it to end instead of "
        "failing (the workflow's run rule: a restarted campaign meets the waiting processes of "
        "the Snakemake that died)",
    )
    p.add_argument(
        "--node-fail-attempts",
        type=int,
        default=3,
        help="new jobs submitted for a run whose job's node failed (NODE_FAIL, BOOT_FAIL)",
    )
    # The package whose ``train`` and ``evaluate`` modules a job runs (tests use a stand-in).
    p.add_argument("--engine", default="hcformer.engine", help=argparse.SUPPRESS)
    s = p.add_argument_group("slurm (default: the experiment's resources)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument("--nodes", type=int)
    s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--tasks-per-node", type=int, help="DDP processes per node (= GPUs)")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--mem-gb", type=float)
    s.add_argument("--time-min", type=int)
    s.add_argument("--signal-delay-s", type=int, default=120)
    s.add_argument("--setup", action="append", default=[], help="a shell line run before the job")
    s.add_argument("--sbatch", action="append", default=[], metavar="FLAG=VALUE")
    return p


def _slurm_options(args: argparse.Namespace) -> SlurmOptions:
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--sbatch {item!r}: expected FLAG=VALUE, e.g. --sbatch exclude=node1"
            )
        extra[key.lstrip("-")] = value
    # Every other SlurmOptions field is the flag of the same name.
    named = {f.name: getattr(args, f.name) for f in fields(SlurmOptions) if f.name != "extra"}
    return SlurmOptions(**named, extra=extra)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    specs = plan(
        experiment=args.experiment,
        config=args.config,
        scale=args.scale,
        seeds=[args.seed] if args.seed is not None else list(args.seeds),
        results=args.results,
        run_folder=args.run_dir,
        overrides=args.overrides,
        engine=args.engine,
    )
    launch = Launch(
        launcher=args.launcher,
        poll_s=args.poll_s if args.poll_s is not None else 30.0 if args.scale == "paper" else 5.0,
        submit_attempts=args.submit_attempts,
        retry_backoff_s=args.retry_backoff_s,
        wait_locked=args.wait_locked,
        node_fail_attempts=args.node_fail_attempts,
        slurm=_slurm_options(args) if args.launcher == "slurm" else SlurmOptions(),
    )
    return run(specs, launch)
