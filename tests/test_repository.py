"""The repository cites nothing its users do not have.

No tracked file may point at documents outside the repository: the first wave's design
document, private notes (the implementation notes, anything under the shared folder beside the
checkout) or the project's own issue numbers. A file says the fact itself, or points into
``docs/`` or at the authors' public code by file name. An upstream project's issue is a public
source and stays allowed when it names its repository ("github facebookresearch/Mask2Former issue
9"). This file spells the forbidden words in pieces, so that it passes its own check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The pieces of what may not appear (joined where used, never whole in this file).
DESIGN = "DESIGN" + ".md"
NOTES = "implementation" + "-notes"
SHARED = ".." + "/shared"
WORK_SHARED = "/work" + "/shared"
ISSUE = "issue" + " #"
# What may not appear (an issue number after "issue"/"Issue"/"issues", or alone in brackets).
FORBIDDEN = re.compile(
    "|".join(map(re.escape, (DESIGN, NOTES, SHARED, WORK_SHARED)))
    + r"|[Ii]ssues? "
    + "#"
    + r"|\("
    + "#"
    + r"[0-9]+\)"
)
# The one exception: an issue of a named upstream repository (``owner/name issue [#]N``).
UPSTREAM_ISSUE = re.compile(r"\b[\w.-]+/[\w.-]+ issues? #?[0-9]+")


def outside_references(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of ``text`` that cites something outside the
    repository (upstream issues of a named repository left out)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if FORBIDDEN.search(UPSTREAM_ISSUE.sub("", line)):
            found.append((number, line.strip()))
    return found


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name]


@pytest.mark.parametrize(
    "line",
    [
        f"see {DESIGN}, step 6",
        f"# ({NOTES}.md, 'Head')",
        f"({SHARED}/notes/slurm-one-node.md)",
        f"as in {WORK_SHARED}/paper/tables.yaml",
        f"Target ({ISSUE}2): at least 3x faster",
        f"## I{ISSUE[1:]}5's targets",
        "the issues " + "#4 and #9",
        "done in (" + "#12)",
        f"facebookresearch/Mask2Former {ISSUE}9 and {ISSUE}9",  # ours after an upstream one
    ],
)
def test_a_reference_outside_the_repository_is_found(line):
    assert outside_references(f"first line\n{line}\n") == [(2, line)]


@pytest.mark.parametrize(
    "line",
    [
        "a published training time (github facebookresearch/Mask2Former issue 9)",
        f"facebookresearch/detectron2 {ISSUE}1234",
        "docs/fidelity.md, P6; the authors' hcformer/modeling/backbone/resnet.py",
        'latex_escape("a_b & 50% #1")',
        "source /cluster/projects/hcformer/.venv/bin/activate",  # a cluster's path in an example
        "issue tracking systems",  # licence text
    ],
)
def test_facts_docs_and_upstream_issues_pass(line):
    assert outside_references(line) == []


def test_no_tracked_file_cites_what_users_do_not_have():
    offending = []
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file():  # e.g. the `slurm` link to a profile folder
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        offending += [f"{name}:{n}: {line}" for n, line in outside_references(text)]
    assert not offending, (
        "references to documents outside the repository (say the fact, or point into docs/):\n"
        + "\n".join(offending)
    )
