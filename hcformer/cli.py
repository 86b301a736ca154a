"""The ``hcformer`` command: one entry point, a sub-command per step of the pipeline.

Each sub-command is a module of :mod:`hcformer.commands` that exposes ``main(argv) -> int``;
this file only maps names to modules and imports the chosen one when it is called (not at the
top), so that ``hcformer status`` never pays for torch and ``hcformer train`` never for seaborn.

Errors a user can fix (:class:`hcformer.errors.HCFormerError`) print as one line on stderr
and exit with status 2; ``--debug`` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import os
import select
import sys

from hcformer.errors import HCFormerError

# name -> (module, one-line help). Every module defines ``main(argv: list[str]) -> int``.
# fmt: off
COMMANDS: dict[str, tuple[str, str]] = {
    "experiments": ("hcformer.commands.experiments", "list the experiments of the paper's tables"),
    "profile": ("hcformer.commands.profile", "parameters, GFLOPs and latency of a table's rows"),
    "synth-data": ("hcformer.commands.synth_data", "write a synthetic dataset in a real format"),
    "prepare-data": ("hcformer.commands.prepare_data", "make an unzipped official dataset readable"),
    "check-data": ("hcformer.commands.check_data", "check the datasets and weights of a scale"),
    "fetch-weights": ("hcformer.commands.fetch_weights", "download the pretrained backbones into a folder"),
    "evaluate-panoptic": ("hcformer.commands.evaluate_panoptic", "PQ/SQ/RQ as panopticapi"),
    "evaluate-instance": ("hcformer.commands.evaluate_instance", "COCO AP (and boundary AP)"),
    "evaluate-semantic": ("hcformer.commands.evaluate_semantic", "mIoU and pixel accuracy"),
    "train": ("hcformer.commands.train", "train one experiment into a run folder"),
    "evaluate": ("hcformer.commands.evaluate", "evaluate a run folder, write metrics.json"),
    "run": ("hcformer.commands.run", "train then evaluate one (experiment, seed) via a launcher"),
    "campaign": ("hcformer.commands.campaign", "snakemake, after unlocking a dead campaign"),
    "sync-mlflow": ("hcformer.commands.sync_mlflow", "mirror run folders into MLflow"),
    "aggregate": ("hcformer.commands.aggregate", "medians over seeds into a CSV"),
    "tables": ("hcformer.commands.tables", "LaTeX tables, macros and provenance"),
    "figures": ("hcformer.commands.figures", "ablation figures"),
    "visualize": ("hcformer.commands.visualize", "the Fig. 5-style hierarchy view of a run"),
    "report": ("hcformer.commands.report", "the README summary of a results tree"),
    "status": ("hcformer.commands.status", "where a campaign stands, per table"),
    "budget": ("hcformer.commands.budget", "GPU-hours of a campaign before submitting"),
    "benchmark-train": ("hcformer.commands.benchmark_train", "seconds per training iteration on this GPU"),
}
# fmt: on


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hcformer [--debug] COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "hcformer COMMAND --help shows a command's arguments."]
    return "\n".join(lines)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (captured, closed)
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HCFORMER_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"hcformer: unknown command {name!r}{hint} (see hcformer --help)", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        code = int(module.main(rest) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe or socket: a real error
        # The reader went away (`hcformer experiments --json | head`): stop quietly, as Unix
        # tools do; stdout goes to /dev/null so that Python's own flush at exit cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a tool the closed pipe ended
    except HCFormerError as exc:
        if debug:
            raise
        print(f"hcformer {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hcformer {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
