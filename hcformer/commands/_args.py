"""What several commands share: the parser, the arguments spelt once, the output writer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from hcformer.experiments import scales

DEVICE_HELP = "cpu, cuda, cuda:1 (default: cuda if available)"


def command_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``hcformer <name>``; its description is ``doc``'s first paragraph."""
    return argparse.ArgumentParser(prog=f"hcformer {name}", description=doc.split("\n\n")[0])


def add_scale(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = "paper",
    required: bool = False,
    checked: bool = True,
    listed: bool = False,
    help: str | None = None,
) -> None:
    """``--scale``: one of the scales of ``experiments/scales/``. ``checked``: argparse
    refuses others; ``listed``: the help names them and the default."""
    if listed:
        help = f"{', '.join(scales())} (default {default})"
    parser.add_argument(
        "--scale",
        default=default,
        required=required,
        choices=scales() if checked else None,
        help=help,
    )


def add_results(parser: argparse.ArgumentParser) -> None:
    """``--results DIR`` (required): one scale's results root, the folder that holds ``runs/``,
    ``aggregate/``, ``tables/`` and ``figures/``."""
    parser.add_argument(
        "--results", required=True, help="a scale's results root, e.g. results/smoke"
    )


def add_seeds(parser: argparse.ArgumentParser) -> None:
    """``--seeds K ...``: the seeds of each experiment (default the paper's three runs, Sec. 4.2)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def add_experiment_or_config(
    parser: argparse.ArgumentParser,
    experiment_help: str = "experiment id (see `hcformer experiments`)",
    config_help: str = "a config YAML of one's own instead of --experiment",
) -> None:
    """Exactly one of ``--experiment ID`` (a paper experiment) or ``--config FILE``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--experiment", help=experiment_help)
    what.add_argument("--config", help=config_help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: a torch device name, default the GPU when there is one."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set key=value`` (repeatable) into ``args.overrides``: config overrides."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def add_json_out(parser: argparse.ArgumentParser) -> None:
    """``--out FILE`` (required): where the command writes its JSON."""
    parser.add_argument("--out", required=True, help="the JSON file to write")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`hcformer.models.fuse.InferenceOptions` (``hcformer evaluate``,
    benchmarks): the inference fast paths, all off by default."""
    # Imported here: hcformer.models.fuse loads torch, timm and triton (2.8 s measured), which
    # the commands that share this module without these flags never need.
    from hcformer.models.fuse import COMPILE_MODES, DTYPES

    group = parser.add_argument_group("inference fast paths (evaluation only)")
    group.add_argument(
        "--fuse", action="store_true", help="fold BatchNorms into the preceding convs"
    )
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    group.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="autocast dtype (float32: none)"
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the model (optionally with a mode; default: 'default')",
    )
    group.add_argument(
        "--cuda-graph", action="store_true", help="replay one CUDA graph per input shape"
    )


def inference_options(args: argparse.Namespace):
    """The :class:`hcformer.models.fuse.InferenceOptions` of parsed
    :func:`add_inference_arguments` flags."""
    from hcformer.models.fuse import InferenceOptions  # loaded already by the flags above

    # Each field is the flag of the same name.
    return InferenceOptions(**{f.name: getattr(args, f.name) for f in fields(InferenceOptions)})


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, one newline after it."""
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")


def write_output(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (its folder made), under a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
